"""URL routes: the admin, and the probes for load balancers and kubelets (``backplane.urls``)."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("backplane.urls")),
]
