"""URL routes: the admin, and a health check for load balancers."""

from django.contrib import admin
from django.urls import path

from backplane.views import healthz

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz),
]
