"""Settings: env parsing, validation errors naming the variable, masking, mainnet opt-in."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from config import Settings, describe_settings, load_settings, masked
from error_handler import ConfigError


def _group(annotation: object) -> type[BaseModel]:
    """The settings group model a top-level field is annotated with."""
    assert isinstance(annotation, type)
    assert issubclass(annotation, BaseModel)
    return annotation


def test_defaults_are_safe() -> None:
    """Default settings trade on testnet, paper-first, with Telegram disabled."""
    s = load_settings(env_file=None)
    assert s.exchange.testnet is True
    assert s.exchange.allow_mainnet is False
    assert s.exchange.has_keys is False
    assert s.telegram.enabled is False
    assert s.storage.effective_database_url.startswith("sqlite:///")


def test_required_env_names_reach_their_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every env var other issues rely on lands in its nested field."""
    env = {
        "KESTREL_EXCHANGE__API_KEY": "key-123456",
        "KESTREL_EXCHANGE__API_SECRET": "secret-abcdef",
        "KESTREL_EXCHANGE__TESTNET": "true",
        "KESTREL_EXCHANGE__BASE_URL": "http://127.0.0.1:8123",
        "KESTREL_TELEGRAM__TOKEN": "123:ABC",
        "KESTREL_TELEGRAM__CHAT_IDS": "[11, 22]",
        "KESTREL_TELEGRAM__BASE_URL": "http://127.0.0.1:8124/bot",
        "KESTREL_STORAGE__DATA_DIR": "/tmp/kestrel-data",
        "KESTREL_STORAGE__DATABASE_URL": "postgresql+psycopg://u@127.0.0.1/db",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = load_settings(env_file=None)
    assert s.exchange.api_key is not None
    assert s.exchange.api_key.get_secret_value() == "key-123456"
    assert s.exchange.has_keys
    assert s.exchange.base_url == "http://127.0.0.1:8123"
    assert s.telegram.chat_ids == [11, 22]
    assert s.telegram.enabled
    assert s.telegram.base_url == "http://127.0.0.1:8124/bot"
    assert s.storage.data_dir == Path("/tmp/kestrel-data")
    assert s.storage.effective_database_url == "postgresql+psycopg://u@127.0.0.1/db"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1,2,3", [1, 2, 3]), ("[4]", [4]), ("7", [7]), ("", [])],
)
def test_list_variables_accept_csv_and_json(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[int]
) -> None:
    """Chat ids parse from CSV, JSON lists and single values."""
    monkeypatch.setenv("KESTREL_TELEGRAM__CHAT_IDS", raw)
    assert load_settings(env_file=None).telegram.chat_ids == expected


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"KESTREL_RISK__MAX_DAILY_LOSS": "abc"}, "KESTREL_RISK__MAX_DAILY_LOSS"),
        ({"KESTREL_RISK__MAX_DAILY_LOSS": "2"}, "KESTREL_RISK__MAX_DAILY_LOSS"),
        ({"KESTREL_SIMULATION__FEED": "carrier-pigeon"}, "KESTREL_SIMULATION__FEED"),
        ({"KESTREL_EXCHANGE__TESTNET": "maybe"}, "KESTREL_EXCHANGE__TESTNET"),
        ({"KESTREL_TELEGRAM__CHAT_IDS": "one,two"}, "KESTREL_TELEGRAM__CHAT_IDS"),
        ({"KESTREL_EXCHANGE__BASE_URL": "ftp://x"}, "KESTREL_EXCHANGE"),
        ({"KESTREL_UI__WEB_HOST": "0.0.0.0"}, "KESTREL_UI__WEB_HOST"),
        (
            {"KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.5", "KESTREL_RISK__MAX_DRAWDOWN": "0.2"},
            "KESTREL_RISK",
        ),
    ],
)
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    """A bad value raises ConfigError whose message names the env var."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings(env_file=None)
    assert named in info.value.message


@pytest.mark.parametrize("off", ["none", "None", "null", "OFF", "", " "])
def test_optional_rules_switch_off_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, off: str
) -> None:
    """Every value in the environment is text: an optional rule is switched off by "none",
    "null", "off" or an empty value; a number still sets it, and 0 is refused."""
    monkeypatch.setenv("KESTREL_RISK__TAKE_PROFIT_ATR_MULTIPLE", off)
    monkeypatch.setenv("KESTREL_RISK__BREAK_EVEN_AT_R", off)
    risk = load_settings(env_file=None).risk
    assert risk.take_profit_atr_multiple is None
    assert risk.break_even_at_r is None
    monkeypatch.setenv("KESTREL_RISK__TAKE_PROFIT_ATR_MULTIPLE", "2.5")
    assert load_settings(env_file=None).risk.take_profit_atr_multiple == 2.5
    monkeypatch.setenv("KESTREL_RISK__BREAK_EVEN_AT_R", "0")
    with pytest.raises(ConfigError, match="KESTREL_RISK__BREAK_EVEN_AT_R"):
        load_settings(env_file=None)


def test_several_errors_are_all_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bad variable is reported at once, not one per run."""
    monkeypatch.setenv("KESTREL_RISK__MAX_DAILY_LOSS", "x")
    monkeypatch.setenv("KESTREL_SIMULATION__TAKER_FEE", "y")
    with pytest.raises(ConfigError) as info:
        load_settings(env_file=None)
    assert "KESTREL_RISK__MAX_DAILY_LOSS" in info.value.message
    assert "KESTREL_SIMULATION__TAKER_FEE" in info.value.message


def test_mainnet_needs_explicit_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """testnet=false alone is refused; with allow_mainnet it is accepted."""
    monkeypatch.setenv("KESTREL_EXCHANGE__TESTNET", "false")
    with pytest.raises(ConfigError, match="ALLOW_MAINNET"):
        load_settings(env_file=None)
    monkeypatch.setenv("KESTREL_EXCHANGE__ALLOW_MAINNET", "true")
    assert load_settings(env_file=None).exchange.testnet is False


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    """Values in a .env file apply, nested with __."""
    env_file = tmp_path / "custom.env"
    env_file.write_text(
        "KESTREL_SIMULATION__STARTING_BALANCE=2500\nKESTREL_STRATEGY__PAIRS=ETH/USDT\n"
    )
    s = load_settings(env_file=env_file)
    assert s.simulation.starting_balance == 2500
    assert s.strategy.pairs == ["ETH/USDT"]


def test_settings_are_frozen() -> None:
    """Settings cannot be mutated after loading."""
    s = load_settings(env_file=None)
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError subclass
        s.exchange.testnet = False


def test_masked_hides_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """masked() shows *** for set secrets and never their values."""
    monkeypatch.setenv("KESTREL_EXCHANGE__API_SECRET", "very-secret-value")
    monkeypatch.setenv("KESTREL_TELEGRAM__TOKEN", "123:tok-secret")
    data = masked(load_settings(env_file=None))
    assert data["exchange"]["api_secret"] == "***"
    assert data["telegram"]["token"] == "***"
    assert "very-secret-value" not in repr(data)
    assert "tok-secret" not in repr(data)


def test_describe_lists_every_field() -> None:
    """describe_settings covers every field of every group with its env var."""
    rows = describe_settings()
    names = {row[0] for row in rows}
    expected = sum(
        len(_group(field.annotation).model_fields) for field in Settings.model_fields.values()
    )
    assert len(names) == expected
    assert "KESTREL_EXCHANGE__API_KEY" in names
