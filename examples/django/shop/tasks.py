"""The shop's command, run by ``celery -A proj worker -Q orders`` (found by ``app.autodiscover_tasks()``)."""

import os

from proj.celery import outbox

from .models import Order

QUEUE = os.environ.get("ORDERS_QUEUE", "orders")


@outbox.command(target=QUEUE, retries=3)
def confirm_order(order_id: int) -> str:
    """Confirm an order: its row exists, since the command was pushed in the order's own transaction."""
    order = Order.objects.get(pk=order_id)
    order.status = "confirmed"
    order.save(update_fields=["status"])
    return f"order {order.pk}: {order.quantity} x {order.item} confirmed"
