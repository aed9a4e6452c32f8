"""Background work under one supervisor: it may fail, trading goes on, the operator is told.

Each background component (state snapshots, retraining, the pair-list refresh, backfill)
runs as `supervised_loop` steps with its own `CircuitBreaker`: a failure is logged with its
context and retried with jittered backoff; after `threshold` failures in a row the breaker
opens and the component rests for `reset_after` seconds before one probe. The operator hears
of the first failure of a run of them and of the breaker opening, not of every retry. Even a
`FatalError` raised there (a full disk under the snapshots, a broken model) stays contained:
only the trading path itself ends a run through the fail-safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from error_handler import BotError, BreakerState, CircuitBreaker
from models import ErrorRaised, EventSink
from utils.utilities import supervised_loop


log = structlog.get_logger(__name__)


class Supervisor:
    """Run named background loops, each behind its own circuit breaker.

    Args:
        stop: set when the run ends; every loop returns then.
        alert: the daemon's alert bus; failures go out as `ErrorRaised`.
        threshold: consecutive failures that open a component's breaker.
        reset_after: seconds an open breaker rests before a probe.
        base: first backoff delay in seconds (doubling, full jitter).
        cap: longest backoff delay in seconds.
    """

    def __init__(
        self,
        stop: asyncio.Event,
        alert: EventSink,
        *,
        threshold: int = 3,
        reset_after: float = 300.0,
        base: float = 1.0,
        cap: float = 60.0,
    ) -> None:
        self._stop = stop
        self._alert = alert
        self._threshold = threshold
        self._reset_after = reset_after
        self._base = base
        self._cap = cap
        self.breakers: dict[str, CircuitBreaker] = {}
        self._quiet: set[str] = set()  # failing components the operator already heard of

    def loop(self, name: str, step: Callable[[], Awaitable[None]]) -> Coroutine[Any, Any, None]:
        """Return the coroutine that runs `step` over and over until the run stops."""
        breaker = self.breakers.setdefault(
            name,
            CircuitBreaker(name, threshold=self._threshold, reset_after=self._reset_after),
        )

        async def step_then_note() -> None:
            await step()
            self._quiet.discard(name)  # working again: the next failure is news

        return supervised_loop(
            name,
            step_then_note,
            self._stop,
            breaker=breaker,
            base=self._base,
            cap=self._cap,
            on_failure=self._failed,
            contain_fatal=True,
        )

    def _failed(self, name: str, error: BaseException) -> None:
        breaker = self.breakers[name]
        message = error.message if isinstance(error, BotError) else repr(error)
        opened = breaker.state is BreakerState.OPEN
        if opened:
            text = (
                f"{name} failed {breaker.failures} times in a row ({message}); paused for "
                f"{self._reset_after:.0f} s, trading goes on"
            )
        elif name not in self._quiet:
            text = f"{name} failed ({message}); retrying, trading goes on"
        else:
            return
        self._quiet.add(name)
        log.warning("background_failed", component=name, breaker=str(breaker.state))
        self._alert(ErrorRaised(text, component=name, breaker=str(breaker.state)))

    def describe(self) -> dict[str, dict[str, Any]]:
        """Return each component's breaker state and consecutive failures."""
        return {
            name: {"state": str(breaker.state), "failures": breaker.failures}
            for name, breaker in self.breakers.items()
        }
