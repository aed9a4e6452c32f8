"""The simulated exchange, the replay feed, pair schedules and the backtest fast path.

A matching engine behind the same order interface as the live exchange; the replay feed
that drives it from archived candles; point-in-time pair schedules for dynamic pairs; and
the numba fast path for single-strategy sweeps, which takes the replay's decisions.

This module is the entry point; the parts live in their own modules and are re-exported
here, so `from trade_simulator import X` works for all of them:

* `matching_engine`: `SimulatedExchange`, `sim_market`, `slipped_price`, `quote_qty`, and
  the fill conventions (documented there).
* `replay_feed`: `ReplayFeed`, `SimDriver` (the simulated exchange in front of the engine,
  with the backtest's quiet-stretch short path), `PairSchedule`, `PairTarget`.
* `fast_path`: `run_fast`, `fast_backtest`, `fast_path_blockers`, `BacktestResult`,
  `result_from_summary`, `infer_timeframe`.
* `fast_standard`: `run_standard`, `standard_blockers`, `unsupported` (the fast path under
  the standard risk profile); `fast_portfolio`: `run_portfolio` (its several pairs);
  `fast_segments`: `run_segments` (either over long archives, a time segment at a time).
"""

from __future__ import annotations

from fast_path import TRADE_COLUMNS as TRADE_COLUMNS
from fast_path import BacktestResult as BacktestResult
from fast_path import fast_backtest as fast_backtest
from fast_path import fast_path_blockers as fast_path_blockers
from fast_path import infer_timeframe as infer_timeframe
from fast_path import result_from_summary as result_from_summary
from fast_path import run_fast as run_fast
from fast_portfolio import run_portfolio as run_portfolio
from fast_segments import SegmentRules as SegmentRules
from fast_segments import run_segments as run_segments
from fast_standard import run_standard as run_standard
from fast_standard import standard_blockers as standard_blockers
from fast_standard import unsupported as unsupported
from matching_engine import ZERO as ZERO
from matching_engine import SimulatedExchange as SimulatedExchange
from matching_engine import quote_qty as quote_qty
from matching_engine import sim_market as sim_market
from matching_engine import slipped_price as slipped_price
from replay_feed import PairSchedule as PairSchedule
from replay_feed import PairTarget as PairTarget
from replay_feed import Progress as Progress
from replay_feed import ReplayFeed as ReplayFeed
from replay_feed import SegmentedReplayFeed as SegmentedReplayFeed
from replay_feed import SimDriver as SimDriver
from utils.utilities import ReplayClock as ReplayClock
