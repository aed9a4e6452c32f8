"""The error tree, the one ccxt mapper, recovery policies, circuit breaker, fail-safe."""

from __future__ import annotations

import ccxt
import pytest

import error_handler as eh
from error_handler import (
    BreakerState,
    CircuitBreaker,
    map_ccxt_errors,
    run_fail_safe,
    translate_ccxt_error,
)


CCXT_CASES = [
    (ccxt.RateLimitExceeded, eh.RateLimitError),
    (ccxt.DDoSProtection, eh.RateLimitError),
    (ccxt.RequestTimeout, eh.RequestTimeoutError),
    (ccxt.OnMaintenance, eh.ExchangeUnavailableError),
    (ccxt.ExchangeNotAvailable, eh.ExchangeUnavailableError),
    (ccxt.InvalidNonce, eh.ClockSkewError),
    (ccxt.ChecksumError, eh.ClockSkewError),
    (ccxt.NetworkError, eh.NetworkError),
    (ccxt.NullResponse, eh.BadResponseError),
    (ccxt.BadResponse, eh.BadResponseError),
    (ccxt.CancelPending, eh.RecoverableError),
    (ccxt.OperationFailed, eh.RecoverableError),
    (ccxt.AuthenticationError, eh.AuthenticationError),
    (ccxt.PermissionDenied, eh.AuthenticationError),
    (ccxt.AccountNotEnabled, eh.AuthenticationError),
    (ccxt.AccountSuspended, eh.AuthenticationError),
    (ccxt.InsufficientFunds, eh.InsufficientFundsError),
    (ccxt.OrderNotFound, eh.OrderNotFoundError),
    (ccxt.OrderNotCached, eh.OrderNotFoundError),
    (ccxt.InvalidOrder, eh.OrderRejected),
    (ccxt.OrderImmediatelyFillable, eh.OrderRejected),
    (ccxt.OrderNotFillable, eh.OrderRejected),
    (ccxt.DuplicateOrderId, eh.OrderRejected),
    (ccxt.ContractUnavailable, eh.OrderRejected),
    (ccxt.BadSymbol, eh.OrderRejected),
    (ccxt.MarketClosed, eh.ExchangeRejectedError),
    (ccxt.OperationRejected, eh.ExchangeRejectedError),
    (ccxt.NoChange, eh.ExchangeRejectedError),
    (ccxt.MarginModeAlreadySet, eh.ExchangeRejectedError),
    (ccxt.ManualInteractionNeeded, eh.ExchangeRejectedError),
    (ccxt.RestrictedLocation, eh.ExchangeRejectedError),
    (ccxt.BadRequest, eh.ExchangeRejectedError),
    (ccxt.ArgumentsRequired, eh.InvariantError),
    (ccxt.NotSupported, eh.InvariantError),
    (ccxt.InvalidAddress, eh.ExchangeRejectedError),
    (ccxt.ExchangeError, eh.ExchangeRejectedError),
    (ccxt.InvalidProxySettings, eh.ExchangeRejectedError),
    (ccxt.AddressPending, eh.ExchangeRejectedError),
    (ccxt.ExchangeClosedByUser, eh.ExchangeRejectedError),
    (ccxt.UnsubscribeError, eh.RecoverableError),
    (ccxt.BaseError, eh.RecoverableError),
]


def _breaker_state(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state, read afresh through a call.

    mypy would keep the attribute narrowed by an earlier assert across the calls that change it.
    """
    return breaker.state


@pytest.mark.parametrize(("theirs", "ours"), CCXT_CASES, ids=[c[0].__name__ for c in CCXT_CASES])
def test_every_ccxt_class_maps_to_the_most_specific_error(
    theirs: type[Exception], ours: type[eh.BotError]
) -> None:
    """Each ccxt exception becomes exactly our mapped class, chained, with context."""
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        raise theirs("boom")

    with pytest.raises(eh.BotError) as info, map_ccxt_errors(pair="BTC/USDT", op="test"):
        call()
    assert type(info.value) is ours
    assert isinstance(info.value.__cause__, theirs)
    assert info.value.pair == "BTC/USDT"
    assert info.value.context["op"] == "test"
    assert calls == 1  # the mapper never retries by itself


def test_every_ccxt_error_class_is_covered() -> None:
    """No ccxt error class is left out of the table's tests."""
    import inspect

    all_classes: set[type[ccxt.BaseError]] = {
        c for _, c in inspect.getmembers(ccxt, inspect.isclass) if issubclass(c, ccxt.BaseError)
    }
    covered = {theirs for theirs, _ in CCXT_CASES}
    assert not {c.__name__ for c in all_classes - covered}
    for cls in all_classes:
        assert translate_ccxt_error(cls("x")) is not None


def test_non_ccxt_exceptions_pass_through() -> None:
    """Our own errors and unrelated exceptions are not rewrapped."""
    with pytest.raises(eh.OrderRejected), map_ccxt_errors():
        raise eh.OrderRejected("ours")
    with pytest.raises(KeyError), map_ccxt_errors():
        raise KeyError("x")


def test_retry_after_is_carried() -> None:
    """A retry_after set on the ccxt error survives the mapping."""
    error = ccxt.RateLimitExceeded("slow down")
    error.retry_after = 2.5
    ours = translate_ccxt_error(error)
    assert isinstance(ours, eh.RateLimitError)
    assert ours.retry_after == 2.5


def test_exit_codes() -> None:
    """Config and data errors exit 2, other fatal errors 1."""
    assert eh.ConfigError("x").exit_code == 2
    assert eh.DataError("x").exit_code == 2
    assert eh.AuthenticationError("x").exit_code == 1


def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    """Threshold failures open it; after the cool-down one probe; success closes it."""
    now = [0.0]
    breaker = CircuitBreaker("feed", threshold=3, reset_after=10, now=lambda: now[0])
    for _ in range(2):
        breaker.record_failure()
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    now[0] = 9.9
    assert not breaker.allow()
    now[0] = 10.0
    assert _breaker_state(breaker) is BreakerState.HALF_OPEN
    breaker.record_failure()  # the probe failed: open again, timer restarted
    assert _breaker_state(breaker) is BreakerState.OPEN
    now[0] = 20.0
    assert breaker.allow()
    breaker.record_success()
    assert _breaker_state(breaker) is BreakerState.CLOSED
    assert breaker.failures == 0


async def test_fail_safe_runs_every_step_and_returns_exit_code() -> None:
    """A failing or hanging step does not stop the later ones."""
    ran: list[str] = []

    async def ok(name: str) -> None:
        ran.append(name)

    async def broken() -> None:
        ran.append("broken")
        raise RuntimeError("step failed")

    async def hangs() -> None:
        import asyncio

        ran.append("hangs")
        await asyncio.sleep(10)

    code = await run_fail_safe(
        eh.AuthenticationError("bad key"),
        [
            ("stop", lambda: ok("stop")),
            ("cancel", broken),
            ("persist", hangs),
            ("notify", lambda: ok("notify")),
        ],
        step_timeout=0.05,
    )
    assert ran == ["stop", "broken", "hangs", "notify"]
    assert code == 1
    assert await run_fail_safe(eh.ConfigError("x"), []) == 2


def test_describe_includes_context() -> None:
    """describe() gives the error's class, message and context for logs."""
    e = eh.OrderRejected("too small", pair="ETH/USDT", order_id="abc", min_notional="5")
    assert e.describe() == {
        "error": "OrderRejected",
        "message": "too small",
        "pair": "ETH/USDT",
        "order_id": "abc",
        "min_notional": "5",
    }
