"""Placing an order: the order and its ``confirm_order`` command in one ``transaction.atomic()``.

The stock is checked *after* the push: an order over it raises inside the block, Django rolls
the transaction back, and neither the order nor its command ever existed.
"""

import json
import uuid

from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from .models import Order
from .tasks import confirm_order

#: Items in stock per order: more is refused after the order and its command were written.
STOCK = 100


class OutOfStock(Exception):
    pass


def place_order(item: str, quantity: int) -> tuple[Order, uuid.UUID]:
    """Save an order and push its confirmation in one transaction; OutOfStock (and nothing kept) over the stock."""
    with transaction.atomic():
        order = Order.objects.create(item=item, quantity=quantity)
        command_id = confirm_order.push(order.pk)  # on Django's connection, inside this transaction
        if quantity > STOCK:
            raise OutOfStock(f"only {STOCK} {item} in stock")
    return order, command_id


@csrf_exempt  # an API for the example's scripts; a real one authenticates its callers
@require_POST
def orders(request: HttpRequest) -> HttpResponse:
    body = json.loads(request.body or b"{}")
    try:
        order, command_id = place_order(str(body["item"]), int(body["quantity"]))
    except OutOfStock as exc:
        return JsonResponse({"detail": str(exc)}, status=409)
    return JsonResponse({"order_id": order.pk, "command_id": str(command_id)}, status=201)


@require_GET
def order(request: HttpRequest, order_id: int) -> HttpResponse:
    found = get_object_or_404(Order, pk=order_id)
    return JsonResponse({"order_id": found.pk, "item": found.item, "status": found.status})
