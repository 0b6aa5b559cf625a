"""A FastAPI shop on PostgreSQL whose order endpoints write the order and its command in one transaction.

Library mode: the shop's own Celery app (configured by shopconfig.py from the environment) with an
outbox attached, ``Outbox(app)``. ``POST /orders`` (a sync ``Session``) and ``POST /async/orders``
(an ``AsyncSession``, ``cmd.push_async``) insert an order, push ``confirm_order`` in the same
transaction, and only then check the stock: an order over the stock is refused (409), the
transaction rolls back, and neither the order nor its command ever existed.

Run it: ``celery -A shop worker -Q orders`` and ``celery -A shop beat`` (after
``orch-outbox -A shop:outbox migrate``), and serve ``shop:api`` with any ASGI server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated

from celery import Celery
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy import String, create_engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from orch_outbox import Outbox

app = Celery("shop")
app.config_from_object("shopconfig")
outbox = Outbox(app)  # the outbox table lives in outbox_database_url: the shop's own database

DATABASE_URL: str = app.conf.outbox_database_url
QUEUE = os.environ.get("ORDERS_QUEUE", "orders")
#: Items in stock per order: more is refused *after* the order and its command were written.
STOCK = 100

engine = create_engine(DATABASE_URL)
Sessions = sessionmaker(engine)


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(String(200))
    quantity: Mapped[int]
    status: Mapped[str] = mapped_column(String(20), default="new")


# -- the command, run by `celery -A shop worker -Q orders` ------------------------------------------


@outbox.command(target=QUEUE, retries=3)
def confirm_order(order_id: int) -> str:
    """Confirm an order. It exists: its command was committed with it."""
    with Sessions.begin() as session:
        order = session.get_one(Order, order_id)
        order.status = "confirmed"
        return f"order {order_id}: {order.quantity} x {order.item} confirmed"


# -- the API ------------------------------------------------------------------------------------------


class NewOrder(BaseModel):
    item: str = Field(min_length=1, max_length=200)
    quantity: int = Field(gt=0)


class Placed(BaseModel):
    order_id: int
    command_id: uuid.UUID


class Shown(BaseModel):
    id: int
    item: str
    quantity: int
    status: str


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    """The asyncio engine (psycopg async) lives as long as the app's event loop."""
    async_engine = create_async_engine(DATABASE_URL)
    api.state.async_sessions = async_sessionmaker(async_engine, expire_on_commit=False)
    yield
    await async_engine.dispose()


api = FastAPI(title="shop", lifespan=lifespan)


def get_session() -> Iterator[Session]:
    with Sessions() as session:
        yield session


DbSession = Annotated[Session, Depends(get_session)]


def check_stock(order: Order) -> None:
    """A rule checked after the push: raising rolls the whole transaction back, the command with it."""
    if order.quantity > STOCK:
        raise HTTPException(409, f"only {STOCK} {order.item} in stock")


@api.post("/orders", status_code=201)
def place_order(body: NewOrder, session: DbSession) -> Placed:
    with session.begin():  # commits at the end of the block, rolls back if it raises
        order = Order(item=body.item, quantity=body.quantity)
        session.add(order)
        session.flush()  # the order's id
        command_id = confirm_order.push(session, order.id)  # one INSERT in this transaction
        check_stock(order)
        order_id = order.id
    return Placed(order_id=order_id, command_id=command_id)


@api.post("/async/orders", status_code=201)
async def place_order_async(body: NewOrder, request: Request) -> Placed:
    sessions: async_sessionmaker[AsyncSession] = request.app.state.async_sessions
    async with sessions.begin() as session:  # commits at the end of the block, rolls back if it raises
        order = Order(item=body.item, quantity=body.quantity)
        session.add(order)
        await session.flush()
        command_id = await confirm_order.push_async(session, order.id)  # in this transaction
        check_stock(order)
    return Placed(order_id=order.id, command_id=command_id)


@api.get("/orders/{order_id}")
def show_order(order_id: int, session: DbSession) -> Shown:
    order = session.get(Order, order_id)
    if order is None:
        raise HTTPException(404, f"no order {order_id}")
    return Shown(id=order.id, item=order.item, quantity=order.quantity, status=order.status)
