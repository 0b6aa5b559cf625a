"""Command names by convention, time-ordered ids, and retry backoff policies."""

from __future__ import annotations

import itertools
import pickle
import time
import uuid
import warnings

import pytest
from celery import Celery

import orch_outbox.uuid7 as uuid7_module
from orch_outbox import ConfigurationError, Outbox, OutboxTask, Settings
from orch_outbox.backoff import delay_for, resolve
from orch_outbox.outbox import command_name
from orch_outbox.testing import wait_until
from orch_outbox.uuid7 import uuid7, uuid7_many

# -- names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("func_name", "expected"),
    [
        ("SendEmailCommand", "send_email"),  # the documented examples
        ("send_email", "send_email"),
        ("SendEmail", "send_email"),
        ("sendEmail", "send_email"),
        ("HTTPFetch", "http_fetch"),
        ("getHTTPResponseCode", "get_http_response_code"),
        ("Command", "command"),  # a bare "Command" is not emptied
        ("ping", "ping"),
    ],
)
def test_command_name_convention(func_name: str, expected: str) -> None:
    """A ``Command`` suffix is dropped and CamelCase becomes snake_case; snake_case stays as is."""
    assert command_name(func_name) == expected


@pytest.fixture
def bare_outbox(celery_app: Celery) -> Outbox:
    """An outbox whose database is never touched (decoration only)."""
    return Outbox(celery_app, "sqlite://", table_prefix="names_")


def test_decorated_function_is_registered_under_conventional_name(bare_outbox: Outbox) -> None:
    """``@outbox.command`` on ``SendEmailCommand`` and on ``send_email`` both register ``send_email``-style names."""

    @bare_outbox.command
    def SendEmailCommand(to: str) -> None: ...

    @bare_outbox.command()
    def notify_user(user_id: int) -> None: ...

    assert SendEmailCommand.name == "send_email"
    assert notify_user.name == "notify_user"
    assert isinstance(bare_outbox.app.tasks["send_email"], OutboxTask)
    assert bare_outbox.task("notify_user") is bare_outbox.app.tasks["notify_user"]


def test_explicit_name_wins(bare_outbox: Outbox) -> None:
    """An explicit ``name=`` is used instead of the convention."""

    @bare_outbox.command(name="billing.charge_card")
    def SendEmailCommand(to: str) -> None: ...

    assert SendEmailCommand.name == "billing.charge_card"
    assert "billing.charge_card" in bare_outbox.app.tasks
    assert "send_email" not in bare_outbox.app.tasks


# -- uuid7 -----------------------------------------------------------------------------


def test_uuid7_version_and_variant() -> None:
    """Ids are RFC 9562 version 7 with the RFC variant."""
    for _ in range(200):
        value = uuid7()
        assert isinstance(value, uuid.UUID)
        assert value.version == 7
        assert value.variant == uuid.RFC_4122


def test_uuid7_embeds_current_unix_milliseconds() -> None:
    """The top 48 bits are the Unix time in milliseconds at creation."""
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    assert before <= value.int >> 80 <= after


def test_uuid7_sorts_by_creation_time() -> None:
    """Ids created in a later millisecond sort after earlier ones (index-friendly, time-ordered)."""
    ids = [uuid7() for _ in range(3000)]
    ms = [u.int >> 80 for u in ids]
    assert ms == sorted(ms)
    for a, b in itertools.pairwise(ids):
        if (a.int >> 80) < (b.int >> 80):
            assert a < b
    first = uuid7()
    wait_until(lambda: time.time_ns() // 1_000_000 > first.int >> 80, timeout=1, interval=0.001)
    second = uuid7()
    assert first < second
    assert str(first) < str(second)  # also as text, as a uuid column compares


def test_uuid7_unique() -> None:
    """Ids do not collide even within one millisecond."""
    ids = {uuid7() for _ in range(20_000)}
    assert len(ids) == 20_000


def test_uuid7_many_continues_the_same_strictly_increasing_sequence() -> None:
    """A bulk push's ids (``uuid7_many``) are version-7 ids in strictly increasing order, unique, and
    interleave with single ids without going backwards: push order is id order."""
    before = uuid7()
    batch = uuid7_many(5000)
    after = uuid7()
    sequence = [before, *batch, after]
    assert all(a < b for a, b in itertools.pairwise(sequence))
    assert len(set(batch)) == 5000
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in batch)
    assert uuid7_many(0) == []


def test_uuid7_counts_up_across_its_random_bits_and_into_the_next_millisecond(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Within one millisecond an id is the previous one plus one in its 74 random bits: the 62 low bits carry into
    the 12 above the variant, and a millisecond whose 74 bits are used up borrows the next one; the version and
    variant bits stay, and each id is greater than the one before (fails if a carry lost or broke a bit)."""
    ms = time.time_ns() // 1_000_000 + 60_000  # the last id a minute ahead of the clock: the next ones count up
    fixed = (0x7 << 76) | (0b10 << 62)
    all_ones = (1 << 62) - 1
    monkeypatch.setattr(uuid7_module, "_last", (ms << 80) | fixed | (0x5 << 64) | (all_ones - 1))
    made = [u.int for u in uuid7_many(3)]
    carried = (ms << 80) | fixed | (0x6 << 64)
    assert made == [(ms << 80) | fixed | (0x5 << 64) | all_ones, carried, carried + 1]
    monkeypatch.setattr(uuid7_module, "_last", (ms << 80) | fixed | (0xFFF << 64) | all_ones)
    borrowed = uuid7()
    assert borrowed.int == ((ms + 1) << 80) | fixed
    ids = [uuid.UUID(int=v) for v in made] + [borrowed]
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)


def test_uuid7_ids_are_ordinary_uuids() -> None:
    """An id compares, hashes, prints, pickles and parses as the ``uuid.UUID`` of the same value (ids are made
    without ``UUID.__init__``'s checks: this fails if one came out different)."""
    for made in (uuid7(), *uuid7_many(3)):
        same = uuid.UUID(str(made))
        assert made == same and hash(made) == hash(same) and str(made) == str(same) and repr(made) == repr(same)
        assert made.is_safe == same.is_safe
        assert pickle.loads(pickle.dumps(made)) == made
        assert made.bytes == same.bytes and made.hex == same.hex


# -- backoff ---------------------------------------------------------------------------


def settings(**overrides: object) -> Settings:
    return Settings.from_sources({}, env={}, **overrides)


def custom_policy(retry_number: int, error_type: str) -> float:
    """A dotted-path backoff used by a test: depends on both arguments."""
    return 100.0 * retry_number + (1 if error_type == "Slow" else 0)


not_callable_policy = 42


def test_fixed_backoff_returns_base() -> None:
    """``fixed`` waits ``retry_backoff_base`` before every retry."""
    policy = resolve(settings(retry_backoff="fixed", retry_backoff_base=2.5))
    assert [policy(n, "E") for n in range(1, 8)] == [2.5] * 7


def test_exponential_backoff_grows_and_is_capped() -> None:
    """Without jitter: base * 2**(n-1), capped by ``retry_backoff_max``."""
    policy = resolve(
        settings(retry_backoff="exponential", retry_backoff_base=1.0, retry_backoff_max=10.0, retry_jitter=False)
    )
    assert [policy(n, "E") for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_exponential_backoff_with_jitter_stays_within_bounds() -> None:
    """With full jitter each delay is in [0, min(cap, base * 2**(n-1))]."""
    policy = resolve(
        settings(retry_backoff="exponential", retry_backoff_base=2.0, retry_backoff_max=20.0, retry_jitter=True)
    )
    for n in range(1, 8):
        ceiling = min(20.0, 2.0 * 2 ** (n - 1))
        values = [policy(n, "E") for _ in range(50)]
        assert all(0.0 <= v <= ceiling for v in values)
    assert len({policy(6, "E") for _ in range(50)}) > 1  # it is randomised


def test_exponential_jitter_with_fractional_base() -> None:
    """A sub-second base (``retry_backoff_base=0.5``) with the default jitter yields delays, not an error."""
    policy = resolve(
        settings(retry_backoff="exponential", retry_backoff_base=0.5, retry_backoff_max=30.0, retry_jitter=True)
    )
    for n in range(1, 6):
        value = policy(n, "E")
        assert 0.0 <= value <= min(30.0, 0.5 * 2 ** (n - 1))


def test_default_backoff_does_not_rely_on_deprecated_randrange_floats() -> None:
    """The default policy (exponential, jitter, float base) must work on Python 3.12+, where
    ``random.randrange(float)`` raises TypeError; on 3.11 that use shows up as a DeprecationWarning."""
    policy = resolve(settings())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for n in range(1, 5):
            assert 0.0 <= policy(n, "E") <= 300.0


def test_dotted_path_backoff_is_used() -> None:
    """``outbox_retry_backoff`` naming a callable imports and uses it with (retry_number, error_type)."""
    policy = resolve(settings(retry_backoff=f"{__name__}.custom_policy"))
    assert policy is custom_policy
    assert policy(2, "Slow") == 201.0


@pytest.mark.parametrize(
    "path",
    ["no_such_module_xyz.policy", "os.path.no_such_function", f"{__name__}.not_callable_policy"],
)
def test_bad_dotted_backoff_raises_configuration_error(path: str) -> None:
    """A dotted path that does not import, or names no callable, is a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match="outbox_retry_backoff"):
        resolve(settings(retry_backoff=path))


def test_bad_dotted_backoff_fails_at_outbox_start(celery_app: Celery) -> None:
    """An outbox configured with an unimportable backoff refuses it when its policy is first resolved."""
    outbox = Outbox(celery_app, "sqlite://", retry_backoff="no_such_module_xyz.policy")
    with pytest.raises(ConfigurationError, match="no_such_module_xyz"):
        _ = outbox.backoff


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(5.0, 5.0), (-3.0, 0.0), (1e9, 60.0), (float("nan"), 60.0), (0, 0.0)],
)
def test_delay_for_clamps_to_zero_and_cap(raw: float, expected: float) -> None:
    """Whatever a policy returns, the delay used is within [0, cap] (NaN → cap)."""
    assert delay_for(lambda _n, _e: raw, 1, "E", 60.0) == expected
