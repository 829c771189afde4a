"""Routes. The POST views are exempt from CSRF: they are an API authenticated by a bearer
token, not by a cookie a browser would send on its own.
"""

from __future__ import annotations

from django.urls import path  # type: ignore[import-untyped]
from django.views.decorators.csrf import csrf_exempt  # type: ignore[import-untyped]

from example_apps.django_app import views

urlpatterns = [
    path("payments", csrf_exempt(views.create_payment)),
    path("payments/<str:payment_id>", views.get_payment),
    path("health", views.health),
    path("_stats", views.stats),
]
