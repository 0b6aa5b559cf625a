"""The shop's API and the admin, with the outbox's page under it (before the admin's own catch-all)."""

from django.contrib import admin
from django.urls import include, path
from shop import views

urlpatterns = [
    path("orders/", views.orders, name="orders"),
    path("orders/<int:order_id>/", views.order, name="order"),
    path("admin/outbox/", include("orch_outbox.contrib.django.urls")),
    path("admin/", admin.site.urls),
]
