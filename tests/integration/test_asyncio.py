"""Pushing under asyncio: ``push_async`` / ``push_many_async`` on SQLAlchemy's AsyncSession and AsyncConnection
(psycopg async), and a FastAPI endpoint that pushes in its request's transaction (httpx client), run by a worker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from orch_outbox import InvalidInput, Outbox
from orch_outbox.testing import wait_until

from .support import run_worker, unique_target
from conftest import PG_URL

pytestmark = pytest.mark.pg


def _async_url() -> str:
    return "postgresql+psycopg://" + PG_URL.split("://", 1)[1]


def test_push_async_joins_the_callers_transaction(make_outbox: Callable[..., Outbox]) -> None:
    """Proves the asyncio push: a command pushed in an AsyncSession exists only if that session commits (a rollback
    drops it), push_many_async inserts beyond the COPY threshold on an AsyncConnection, and bad input is refused with
    the push's own error, writing nothing."""
    outbox = make_outbox()
    target = unique_target("aio")

    @outbox.command(target=target)
    def greet(name: str) -> None: ...

    async def scenario() -> tuple[object, object, list[object]]:
        engine = create_async_engine(_async_url())
        try:
            async with AsyncSession(engine) as session, session.begin():
                kept = await greet.push_async(session, "ada")
            async with AsyncSession(engine) as session:
                dropped = await greet.push_async(session, "bob")
                await session.rollback()
            async with engine.begin() as conn:
                many = await outbox.push_many_async(conn, [greet.s(f"user{i}") for i in range(120)])
            async with AsyncSession(engine) as session:
                with pytest.raises(InvalidInput):
                    await greet.push_async(session, object())
            return kept, dropped, many
        finally:
            await engine.dispose()

    kept, dropped, many = asyncio.run(scenario())
    assert outbox.get(kept).status == "pending"
    assert outbox.store.get(dropped) is None  # type: ignore[arg-type]
    assert len(many) == 120 and all(outbox.store.get(i) is not None for i in many)  # type: ignore[arg-type]
    assert outbox.count(target=target) == 121


def test_a_fastapi_endpoint_pushes_in_its_request_transaction(make_outbox: Callable[..., Outbox]) -> None:
    """Proves the FastAPI pattern: an endpoint saves its own row and pushes a command in one AsyncSession
    transaction; through httpx the command is created, relayed and run by a worker; an endpoint that fails after
    the push leaves no command."""
    import httpx
    from fastapi import FastAPI, HTTPException

    outbox = make_outbox()
    target = unique_target("fastapi")
    sent: list[str] = []

    @outbox.command(target=target)
    def welcome(email: str) -> None:
        sent.append(email)

    engine = create_async_engine(_async_url())
    api = FastAPI()

    @api.post("/signup/{email}")
    async def signup(email: str) -> dict[str, str]:
        async with AsyncSession(engine) as session, session.begin():
            command_id = await welcome.push_async(session, email)
            if email.startswith("bad"):
                raise HTTPException(422, "refused after the push: the transaction rolls back")
        return {"command": str(command_id)}

    async def call() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            ok = await client.post("/signup/ada@example.org")
            bad = await client.post("/signup/bad@example.org")
        await engine.dispose()
        return ok, bad

    ok, bad = asyncio.run(call())
    assert ok.status_code == 200 and bad.status_code == 422
    command_id = ok.json()["command"]
    assert outbox.count(target=target) == 1
    with run_worker(outbox.app, [target], pool="threads", concurrency=1):
        outbox.relay_once()
        wait_until(lambda: outbox.get(command_id).status == "completed", 20)
    assert sent == ["ada@example.org"]
