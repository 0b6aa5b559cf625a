"""``manage.py place_order ITEM QUANTITY``: the view's ``place_order``; prints the order and command ids as JSON."""

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from shop.views import OutOfStock, place_order


class Command(BaseCommand):
    help = "Save an order and push its confirm_order command in one transaction (refused over the stock)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("item")
        parser.add_argument("quantity", type=int)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            order, command_id = place_order(options["item"], options["quantity"])
        except OutOfStock as exc:
            raise CommandError(f"refused: {exc} (the order and its command were rolled back)") from None
        self.stdout.write(json.dumps({"order_id": order.pk, "command_id": str(command_id)}))
