"""The probes' routes, for ``path("", include("backplane.urls"))`` in a host project's URLconf.

Routed, they answer only hosts in ``ALLOWED_HOSTS``; ``backplane.views.ProbeMiddleware``
answers them for any ``Host`` (load balancers and kubelets probe by IP address).
"""

from django.urls import path

from backplane import views

app_name = "backplane"
urlpatterns = [
    path("livez", views.livez, name="livez"),
    path("readyz", views.readyz, name="readyz"),
    path("healthz", views.healthz, name="healthz"),
]
