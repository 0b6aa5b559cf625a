from django.db import models


class Order(models.Model):
    item = models.CharField(max_length=200)
    quantity = models.PositiveIntegerField()
    status = models.CharField(max_length=20, default="new")

    def __str__(self) -> str:
        return f"order {self.pk}: {self.quantity} x {self.item} ({self.status})"
