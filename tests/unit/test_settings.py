"""Settings: ``outbox_*`` keys in the Celery config, ``ORCH_OUTBOX_*`` overrides, validation."""

from __future__ import annotations

import dataclasses
import math

import pytest

from orch_outbox import ConfigurationError, Settings
from orch_outbox.settings import describe, validate_prefix, validate_target

NO_ENV: dict[str, str] = {}


def test_defaults_when_nothing_is_configured() -> None:
    """With no conf and an empty environment every setting takes its documented default."""
    settings = Settings.from_sources({}, env=NO_ENV)
    defaults = {key: default for key, _env, default, _doc in describe()}
    for f in dataclasses.fields(Settings):
        assert getattr(settings, f.name) == defaults[f"outbox_{f.name}"]
    assert settings.table_prefix == "orch_"
    assert settings.batch_size == 200


def test_reads_outbox_keys_from_conf_and_ignores_others() -> None:
    """``outbox_<name>`` keys of the Celery config are read; unprefixed or foreign keys are not."""
    conf = {
        "outbox_batch_size": 17,
        "outbox_table_prefix": "app_",
        "outbox_default_timeout": 12.5,
        "outbox_retry_jitter": False,
        "batch_size": 3,  # not an outbox key
        "broker_url": "memory://",
    }
    settings = Settings.from_sources(conf, env=NO_ENV)
    assert settings.batch_size == 17
    assert settings.table_prefix == "app_"
    assert settings.default_timeout == 12.5
    assert settings.retry_jitter is False


def test_none_in_conf_means_default() -> None:
    """A key present with the value None (Celery's "unset") keeps the default."""
    settings = Settings.from_sources({"outbox_batch_size": None}, env=NO_ENV)
    assert settings.batch_size == 200


def test_environment_overrides_conf() -> None:
    """``ORCH_OUTBOX_*`` in the environment wins over the Celery config key."""
    conf = {"outbox_batch_size": 17, "outbox_table_prefix": "app_"}
    env = {"ORCH_OUTBOX_BATCH_SIZE": "42", "ORCH_OUTBOX_TABLE_PREFIX": "env_"}
    settings = Settings.from_sources(conf, env=env)
    assert settings.batch_size == 42
    assert settings.table_prefix == "env_"


def test_empty_environment_value_does_not_override() -> None:
    """An empty ``ORCH_OUTBOX_X=`` is treated as unset, not as an empty value."""
    settings = Settings.from_sources({"outbox_table_prefix": "app_"}, env={"ORCH_OUTBOX_TABLE_PREFIX": ""})
    assert settings.table_prefix == "app_"


def test_explicit_overrides_win_over_environment() -> None:
    """Keyword overrides (``Outbox(app, table_prefix=...)``) win over env and conf."""
    settings = Settings.from_sources({"outbox_batch_size": 5}, env={"ORCH_OUTBOX_BATCH_SIZE": "6"}, batch_size=7)
    assert settings.batch_size == 7


def test_env_argument_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``env=`` the process environment is read."""
    monkeypatch.setenv("ORCH_OUTBOX_BATCH_SIZE", "77")
    assert Settings.from_sources({}).batch_size == 77


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_bool_strings_are_coerced(text: str, expected: bool) -> None:
    """Boolean settings accept the usual spellings from the environment."""
    settings = Settings.from_sources({}, env={"ORCH_OUTBOX_RETRY_JITTER": text})
    assert settings.retry_jitter is expected


def test_numbers_are_coerced_from_strings() -> None:
    """Integer and float settings given as environment strings become numbers of the right type."""
    env = {
        "ORCH_OUTBOX_BATCH_SIZE": "250",
        "ORCH_OUTBOX_DEFAULT_RETRIES": "0",
        "ORCH_OUTBOX_POLL_INTERVAL": "0.25",
        "ORCH_OUTBOX_DEFAULT_TIMEOUT": "30",
    }
    settings = Settings.from_sources({}, env=env)
    assert settings.batch_size == 250 and type(settings.batch_size) is int
    assert settings.default_retries == 0 and type(settings.default_retries) is int
    assert settings.poll_interval == 0.25 and type(settings.poll_interval) is float
    assert settings.default_timeout == 30.0 and type(settings.default_timeout) is float


def test_integral_float_accepted_for_int_setting() -> None:
    """``outbox_batch_size = 100.0`` is accepted as 100 (lossless), ``100.5`` is not."""
    assert Settings.from_sources({"outbox_batch_size": 100.0}, env=NO_ENV).batch_size == 100
    with pytest.raises(ConfigurationError, match="outbox_batch_size"):
        Settings.from_sources({"outbox_batch_size": 100.5}, env=NO_ENV)


@pytest.mark.parametrize(
    ("conf", "env", "key"),
    [
        ({"outbox_default_timeout": -1}, {}, "outbox_default_timeout"),
        ({"outbox_default_timeout": 0}, {}, "outbox_default_timeout"),
        ({}, {"ORCH_OUTBOX_DEFAULT_TIMEOUT": "-5"}, "outbox_default_timeout"),
        ({"outbox_poll_interval": 0}, {}, "outbox_poll_interval"),
        ({"outbox_lock_buffer": -0.1}, {}, "outbox_lock_buffer"),
        ({"outbox_dispatch_timeout": 0}, {}, "outbox_dispatch_timeout"),
        ({"outbox_rescue_interval": -3}, {}, "outbox_rescue_interval"),
        ({"outbox_batch_size": 0}, {}, "outbox_batch_size"),
        ({"outbox_batch_size": 10_001}, {}, "outbox_batch_size"),
        ({"outbox_default_retries": -1}, {}, "outbox_default_retries"),
        ({"outbox_retry_backoff": "linear"}, {}, "outbox_retry_backoff"),
        ({"outbox_retry_backoff_base": -1.0}, {}, "outbox_retry_backoff_base"),
        ({"outbox_retry_backoff_base": 10.0, "outbox_retry_backoff_max": 5.0}, {}, "outbox_retry_backoff"),
        ({"outbox_max_input_bytes": 10}, {}, "outbox_max_input_bytes"),
        ({"outbox_default_timeout": math.nan}, {}, "outbox_default_timeout"),
        ({}, {"ORCH_OUTBOX_POLL_INTERVAL": "nan"}, "ORCH_OUTBOX_POLL_INTERVAL"),
        ({}, {"ORCH_OUTBOX_POLL_INTERVAL": "inf"}, "ORCH_OUTBOX_POLL_INTERVAL"),
        ({}, {"ORCH_OUTBOX_BATCH_SIZE": "ten"}, "ORCH_OUTBOX_BATCH_SIZE"),
        ({}, {"ORCH_OUTBOX_BATCH_SIZE": "1.5"}, "ORCH_OUTBOX_BATCH_SIZE"),
        ({}, {"ORCH_OUTBOX_RETRY_JITTER": "maybe"}, "ORCH_OUTBOX_RETRY_JITTER"),
        ({"outbox_retry_jitter": 1}, {}, "outbox_retry_jitter"),
        ({"outbox_batch_size": True}, {}, "outbox_batch_size"),
        ({"outbox_default_timeout": True}, {}, "outbox_default_timeout"),
        ({"outbox_table_prefix": 5}, {}, "outbox_table_prefix"),
    ],
)
def test_invalid_values_raise_naming_the_key(conf: dict[str, object], env: dict[str, str], key: str) -> None:
    """Every invalid value raises ConfigurationError whose message names the offending key."""
    with pytest.raises(ConfigurationError) as info:
        Settings.from_sources(conf, env=env)
    assert key in str(info.value)


@pytest.mark.parametrize(
    "prefix",
    ["orch-x", "1abc", "x; drop table", "", "Orch_", "a" * 31, "orch x", "orch.", "orch_\n", "ö_"],
)
def test_bad_table_prefix_refused(prefix: str) -> None:
    """A prefix that is not a plain lowercase SQL identifier (it is spliced into DDL) is refused."""
    with pytest.raises(ConfigurationError, match="prefix"):
        Settings.from_sources({"outbox_table_prefix": prefix}, env=NO_ENV)
    with pytest.raises(ConfigurationError):
        validate_prefix(prefix)


@pytest.mark.parametrize("prefix", ["orch_", "_x", "a", "app2_", "a" * 30])
def test_good_table_prefix_accepted(prefix: str) -> None:
    """Plain identifiers of 1..30 characters are accepted unchanged."""
    assert Settings.from_sources({"outbox_table_prefix": prefix}, env=NO_ENV).table_prefix == prefix


@pytest.mark.parametrize("target", ["a b", "x;drop", "q" * 201, "-lead", "email\n", "e\x00", "x/y"])
def test_bad_default_target_refused(target: str) -> None:
    """A default target must be a plain Celery queue name (1-200 of A-Z a-z 0-9 _ . : @ -)."""
    with pytest.raises(ConfigurationError, match="target"):
        Settings.from_sources({"outbox_default_target": target}, env=NO_ENV)


@pytest.mark.parametrize("target", ["", None, 5, b"q"])
def test_validate_target_refuses_empty_and_non_strings(target: object) -> None:
    """``validate_target`` (used at decoration and push) refuses empty and non-string targets."""
    with pytest.raises(ConfigurationError, match="target"):
        validate_target(target)


@pytest.mark.parametrize("target", ["email-worker", "celery", "a.b:c@d", "Q_1", "q" * 200])
def test_good_targets_accepted(target: str) -> None:
    """Ordinary queue names pass validation unchanged."""
    assert validate_target(target) == target
    assert Settings.from_sources({"outbox_default_target": target}, env=NO_ENV).default_target == target


def test_unknown_override_refused() -> None:
    """A misspelt keyword override is an error naming it, not silently ignored."""
    with pytest.raises(ConfigurationError, match="batchsize"):
        Settings.from_sources({}, env=NO_ENV, batchsize=5)


def test_override_values_are_validated_too() -> None:
    """Overrides go through the same coercion and validation as conf and env values."""
    with pytest.raises(ConfigurationError, match="batch_size"):
        Settings.from_sources({}, env=NO_ENV, batch_size=0)
    with pytest.raises(ConfigurationError, match="default_timeout"):
        Settings.from_sources({}, env=NO_ENV, default_timeout="soon")


def test_dotted_path_backoff_accepted_by_settings() -> None:
    """``outbox_retry_backoff`` may name a callable by dotted path (imported later, by the backoff module)."""
    settings = Settings.from_sources({"outbox_retry_backoff": "mymod.policy"}, env=NO_ENV)
    assert settings.retry_backoff == "mymod.policy"


def test_describe_lists_every_setting_with_default_and_doc() -> None:
    """``describe()`` documents each setting: config key, env var, default (== the dataclass default), meaning."""
    rows = describe()
    names = [f.name for f in dataclasses.fields(Settings)]
    assert [key for key, *_ in rows] == [f"outbox_{n}" for n in names]
    plain = Settings()
    for key, env_name, default, doc in rows:
        name = key.removeprefix("outbox_")
        assert env_name == f"ORCH_OUTBOX_{name.upper()}"
        assert default is not dataclasses.MISSING
        assert default == getattr(plain, name)
        assert isinstance(doc, str) and len(doc) > 10
    # the defaults themselves are valid
    plain.validate()


def test_resolved_database_url_defaults_to_sqlite_under_home(tmp_path: object) -> None:
    """An empty database URL means a SQLite file under ``outbox_home``; a set one is returned as is."""
    settings = Settings.from_sources({"outbox_home": str(tmp_path)}, env=NO_ENV)
    url = settings.resolved_database_url()
    assert url.startswith("sqlite:///") and url.endswith("/outbox.sqlite3")
    assert str(tmp_path) in url
    other = Settings.from_sources({"outbox_database_url": "postgresql://x/y"}, env=NO_ENV)
    assert other.resolved_database_url() == "postgresql://x/y"


def test_readme_settings_table_lists_every_setting() -> None:
    """Proves the settings page (docs/settings.md) is the real one: every setting, its variable and its default."""
    from pathlib import Path

    from orch_outbox.settings import describe

    readme = (Path(__file__).resolve().parents[2] / "docs" / "settings.md").read_text()
    for key, env, default, _doc in describe():
        row = f"| `{key}` | `{env}` | `{default!r}` |"
        assert row in readme, f"docs/settings.md lacks or misstates: {row}"
