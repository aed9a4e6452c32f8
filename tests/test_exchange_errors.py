"""Exchange errors: every ccxt exception maps to our tree, retried only when recoverable."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

import ccxt
import pytest
from ccxt.base import errors as ccxt_errors

from error_handler import (
    AuthenticationError,
    BadResponseError,
    BotError,
    ClockSkewError,
    ExchangeRejectedError,
    ExchangeUnavailableError,
    InsufficientFundsError,
    InvariantError,
    NetworkError,
    OrderNotFoundError,
    OrderRejected,
    RateLimitError,
    RecoverableError,
    RequestTimeoutError,
)
from exchange import Exchange, bybit_client_class
from tests.bybit_emulator import BybitEmulator, exchange_settings


ATTEMPTS = 3

# Every exception class of ccxt 4.5.90 and the error it must become (most specific wins).
EXPECTED: dict[str, type[BotError]] = {
    "AccountNotEnabled": AuthenticationError,
    "AccountSuspended": AuthenticationError,
    "AddressPending": ExchangeRejectedError,
    "ArgumentsRequired": InvariantError,
    "AuthenticationError": AuthenticationError,
    "BadRequest": ExchangeRejectedError,
    "BadResponse": BadResponseError,
    "BadSymbol": OrderRejected,
    "BaseError": RecoverableError,
    "CancelPending": RecoverableError,
    "ChecksumError": ClockSkewError,
    "ContractUnavailable": OrderRejected,
    "DDoSProtection": RateLimitError,
    "DuplicateOrderId": OrderRejected,
    "ExchangeClosedByUser": ExchangeRejectedError,
    "ExchangeError": ExchangeRejectedError,
    "ExchangeNotAvailable": ExchangeUnavailableError,
    "InsufficientFunds": InsufficientFundsError,
    "InvalidAddress": ExchangeRejectedError,
    "InvalidNonce": ClockSkewError,
    "InvalidOrder": OrderRejected,
    "InvalidProxySettings": ExchangeRejectedError,
    "ManualInteractionNeeded": ExchangeRejectedError,
    "MarginModeAlreadySet": ExchangeRejectedError,
    "MarketClosed": ExchangeRejectedError,
    "NetworkError": NetworkError,
    "NoChange": ExchangeRejectedError,
    "NotSupported": InvariantError,
    "NullResponse": BadResponseError,
    "OnMaintenance": ExchangeUnavailableError,
    "OperationFailed": RecoverableError,
    "OperationRejected": ExchangeRejectedError,
    "OrderImmediatelyFillable": OrderRejected,
    "OrderNotCached": OrderNotFoundError,
    "OrderNotFillable": OrderRejected,
    "OrderNotFound": OrderNotFoundError,
    "PermissionDenied": AuthenticationError,
    "RateLimitExceeded": RateLimitError,
    "RequestTimeout": RequestTimeoutError,
    "RestrictedLocation": ExchangeRejectedError,
    "UnsubscribeError": RecoverableError,
}


def test_the_table_covers_every_ccxt_exception() -> None:
    """No ccxt exception class is left out of the mapping test."""
    names = {
        name
        for name, cls in inspect.getmembers(ccxt_errors, inspect.isclass)
        if issubclass(cls, ccxt.BaseError)
    }
    assert names == set(EXPECTED)


def _failing_client(exc_name: str, calls: list[str]) -> type:
    # A fake at the transport seam: tickers requests raise `exc_name`, the rest hit the emulator.
    class Failing(bybit_client_class()):  # type: ignore[misc]
        async def fetch(
            self, url: str, method: str = "GET", headers: Any = None, body: Any = None
        ) -> Any:
            if "/v5/market/tickers" in url:
                calls.append(url)
                raise getattr(ccxt, exc_name)(f"injected {exc_name}")
            return await super().fetch(url, method, headers, body)

    return Failing


@pytest.fixture
async def emu() -> AsyncIterator[BybitEmulator]:
    """Return a running emulator."""
    async with BybitEmulator(hang_s=1.0) as server:
        yield server


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_each_ccxt_exception_maps_and_is_retried_only_if_recoverable(
    emu: BybitEmulator, name: str
) -> None:
    """The mapped class is the expected one, and recoverable errors use every attempt."""
    calls: list[str] = []
    exchange = Exchange(
        exchange_settings(emu),
        retry_attempts=ATTEMPTS,
        retry_base_s=0.001,
        retry_cap_s=0.002,
        client_class=_failing_client(name, calls),
    )
    async with exchange:
        with pytest.raises(BotError) as info:
            await exchange.fetch_ticker("BTC/USDT")
    error = info.value
    assert type(error) is EXPECTED[name]
    assert isinstance(error.__cause__, getattr(ccxt, name))
    assert error.pair == "BTC/USDT"
    assert error.component == "exchange"
    assert len(calls) == (ATTEMPTS if isinstance(error, RecoverableError) else 1)


@pytest.fixture
async def ex(emu: BybitEmulator) -> AsyncIterator[Exchange]:
    """Return an open Exchange with short timeouts and fast retries."""
    exchange = Exchange(
        exchange_settings(emu, timeout_s=0.5),
        retry_attempts=ATTEMPTS,
        retry_base_s=0.001,
        retry_cap_s=0.002,
        ip_ban_pause_s=0.01,
    )
    async with exchange:
        yield exchange


@pytest.mark.parametrize(
    ("fault", "expected", "calls"),
    [
        ("5xx", ExchangeUnavailableError, ATTEMPTS),
        ("timeout", RequestTimeoutError, ATTEMPTS),
        ("429", RateLimitError, ATTEMPTS),
        ("403", RateLimitError, ATTEMPTS),
        ("10006", RateLimitError, ATTEMPTS),
        ("malformed", BadResponseError, ATTEMPTS),
        ("10002", ClockSkewError, ATTEMPTS),
        ("auth", AuthenticationError, 1),
        ("10016", ExchangeRejectedError, 1),
    ],
)
async def test_bybit_faults_on_the_wire_map_end_to_end(
    emu: BybitEmulator, ex: Exchange, fault: str, expected: type[BotError], calls: int
) -> None:
    """Faults the emulator injects surface as our errors after the right number of calls."""
    emu.fail_next(fault, times=10, path="/v5/account/wallet-balance")
    with pytest.raises(expected):
        await ex.fetch_balance()
    assert len(emu.requests_to("/v5/account/wallet-balance")) == calls


async def test_transient_faults_are_retried_to_success(emu: BybitEmulator) -> None:
    """Two failures then success: the caller only sees the ticker."""
    emu.fail_next("5xx", times=1, path="/v5/market/tickers")
    emu.fail_next("timeout", times=1, path="/v5/market/tickers")
    exchange = Exchange(
        exchange_settings(emu, timeout_s=0.5),
        retry_attempts=5,
        retry_base_s=0.001,
        retry_cap_s=0.002,
    )
    async with exchange:
        ticker = await exchange.fetch_ticker("ETH/USDT")
    assert ticker.last is not None
    faults = [r.fault for r in emu.requests_to("/v5/market/tickers")]
    assert faults[:2] == ["5xx", "timeout"]
    assert faults[-1] is None


async def test_rate_limit_carries_bybit_reset_delay_and_pauses_the_budget(
    emu: BybitEmulator,
) -> None:
    """10006 gives retry_after from X-Bapi-Limit-Reset-Timestamp and empties that budget."""
    emu.rate_limit_reset_ms = 300
    emu.fail_next("10006", times=5, path="/v5/position/list")
    async with Exchange(exchange_settings(emu), retry_attempts=1) as exchange:
        with pytest.raises(RateLimitError) as info:
            await exchange.fetch_positions()
        assert info.value.retry_after is not None
        assert 0.0 < info.value.retry_after <= 0.3
        assert exchange.rate_limit_budget()["query"] == 0.0
        assert exchange.rate_limit_budget()["order_linear"] > 0.0


async def test_non_json_200_is_a_bad_response_not_garbage(emu: BybitEmulator, ex: Exchange) -> None:
    """An HTTP 200 with a truncated body raises BadResponseError instead of returning junk."""
    emu.fail_next("malformed", times=ATTEMPTS, path="/v5/market/tickers")
    with pytest.raises(BadResponseError):
        await ex.fetch_ticker("BTC/USDT")
