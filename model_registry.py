"""The versioned model registry: every trained model, its lineage, and who is in charge.

On disk, under a configurable root (`<data_dir>/models` by default)::

    <root>/<name>/<version>/            one trained model, written whole or not at all
        manifest.json                   kind, metrics, validation and lineage (see `Lineage`)
        ...                             the kind's own files (`Trained.save`)
    <root>/<name>/aliases.json          {"champion", "challenger", "previous": [...]}

The aliases are one small JSON file replaced atomically (write a temporary file, fsync,
`os.replace`), so a crash mid-write leaves the old aliases or the new ones, never a torn
file and never a lost champion. `previous` is the stack of earlier champions that
`rollback` pops. Versions are sortable by time and never rewritten.

Model kinds are structural (`ModelKind`, `Trained`): anything with a `name` and a
`train(frames, *, seed, time_budget_s)` that returns an object with `save`,
`validation_returns` and `metrics` is a kind. The registry stores; the promotion rules live
in `model_training`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import structlog

from error_handler import DataError
from utils.utilities import atomic_write


log = structlog.get_logger(__name__)

MANIFEST: Final = "manifest.json"
ALIASES: Final = "aliases.json"
CHAMPION: Final = "champion"
CHALLENGER: Final = "challenger"


# -- Model kinds (structural) ----------------------------------------------------------------


@runtime_checkable
class Trained(Protocol):
    """A trained model: it saves itself and reports its out-of-sample results."""

    @property
    def metrics(self) -> dict[str, float]:
        """Return the model's figures (out-of-sample metrics, training time...)."""
        ...

    def save(self, directory: Path) -> None:
        """Write the model's files into `directory` (which exists and is empty)."""
        ...

    def validation_returns(self) -> np.ndarray:
        """Return the per-bar returns on data the model did not train on."""
        ...


class ModelKind(Protocol):
    """A family of models that can be trained from candle frames."""

    @property
    def name(self) -> str:
        """Return the kind's name, e.g. `supervised` or `rl`."""
        ...

    def train(
        self, frames: Mapping[str, pd.DataFrame], *, seed: int, time_budget_s: float
    ) -> Trained:
        """Train on `frames` (pair -> candles) within `time_budget_s` seconds."""
        ...


# -- Manifests -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lineage:
    """Where a version came from: enough to retrain it bit for bit."""

    data_start_ms: int
    data_end_ms: int
    pairs: tuple[str, ...]
    timeframe: str
    feature_set: str
    seed: int
    parent: str | None = None
    code_version: str = ""
    created_ms: int = 0


@dataclass(frozen=True, slots=True)
class Manifest:
    """One registered version: identity, metrics, validation figures and lineage."""

    name: str
    version: str
    kind: str
    metrics: dict[str, float]
    lineage: Lineage
    validation: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the manifest as plain JSON data."""
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Manifest:
        """Return the manifest read back from `to_json` output."""
        lineage = dict(raw["lineage"])
        lineage["pairs"] = tuple(lineage.get("pairs", ()))
        return cls(
            name=str(raw["name"]),
            version=str(raw["version"]),
            kind=str(raw["kind"]),
            metrics={k: float(v) for k, v in raw.get("metrics", {}).items()},
            lineage=Lineage(**lineage),
            validation={k: float(v) for k, v in raw.get("validation", {}).items()},
        )


@dataclass(frozen=True, slots=True)
class Aliases:
    """Which version is champion (in use), which is challenger (in shadow), and the past."""

    champion: str | None = None
    challenger: str | None = None
    previous: tuple[str, ...] = ()


def new_version() -> str:
    """Return a fresh version name: sortable by time, unique within a millisecond."""
    now = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now / 1e9))
    return f"{stamp}.{now // 1_000_000 % 1000:03d}-{uuid.uuid4().hex[:6]}"


@cache
def code_version() -> str:
    """Return the git commit the code runs from ("unknown" outside a checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],  # noqa: S607 - git on PATH
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


# -- The registry ----------------------------------------------------------------------------


class Registry:
    """Versioned model directories with atomically moved champion/challenger aliases.

    Args:
        root: the directory holding one folder per model name.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- Versions ------------------------------------------------------------------------------

    def register(
        self,
        name: str,
        kind: str,
        trained: Trained,
        lineage: Lineage,
        *,
        version: str | None = None,
        validation: Mapping[str, float] | None = None,
    ) -> Manifest:
        """Write `trained` as a new version of `name` and return its manifest.

        The version directory is staged beside its final place and renamed into it, so a
        reader sees the whole version or none of it. No alias moves.
        """
        version = version or new_version()
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / version).exists():
            raise DataError(f"model {name}@{version} already exists")
        stamped = replace(
            lineage,
            code_version=lineage.code_version or code_version(),
            created_ms=lineage.created_ms or time.time_ns() // 1_000_000,
        )
        manifest = Manifest(
            name=name,
            version=version,
            kind=kind,
            metrics={k: float(v) for k, v in trained.metrics.items()},
            lineage=stamped,
            validation=dict(validation or {}),
        )
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
        try:
            trained.save(staging)
            _write_json(staging / MANIFEST, manifest.to_json())
            os.replace(staging, folder / version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("model_registered", name=name, version=version, kind=kind)
        return manifest

    def names(self) -> list[str]:
        """Return the registered model names, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        """Return the complete versions of `name`, oldest first."""
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(
            p.name
            for p in folder.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
        )

    def path(self, name: str, version: str) -> Path:
        """Return the directory of `name@version` (raises when there is none)."""
        folder = self.root / name / version
        if not (folder / MANIFEST).is_file():
            raise DataError(f"no model {name}@{version} under {self.root}")
        return folder

    def manifest(self, name: str, version: str) -> Manifest:
        """Return the manifest of `name@version`.

        Raises:
            DataError: no such version, or an unreadable manifest.
        """
        folder = self.path(name, version)
        try:
            return Manifest.from_json(json.loads((folder / MANIFEST).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read {folder / MANIFEST}: {e}") from e

    def annotate(self, name: str, version: str, validation: Mapping[str, float]) -> Manifest:
        """Merge `validation` figures into a version's manifest (atomically) and return it."""
        current = self.manifest(name, version)
        updated = replace(current, validation={**current.validation, **validation})
        _write_json(self.path(name, version) / MANIFEST, updated.to_json())
        return updated

    # -- Aliases -------------------------------------------------------------------------------

    def aliases(self, name: str) -> Aliases:
        """Return `name`'s aliases (all empty before the first promotion)."""
        path = self.root / name / ALIASES
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return Aliases()
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from e
        return Aliases(
            champion=raw.get(CHAMPION),
            challenger=raw.get(CHALLENGER),
            previous=tuple(raw.get("previous", ())),
        )

    def alias(self, name: str, alias: str) -> str | None:
        """Return the version an alias (`champion` or `challenger`) points at."""
        aliases = self.aliases(name)
        if alias == CHAMPION:
            return aliases.champion
        if alias == CHALLENGER:
            return aliases.challenger
        raise DataError(f"unknown alias {alias!r}: use {CHAMPION} or {CHALLENGER}")

    def _store(self, name: str, aliases: Aliases) -> None:
        # One file, replaced whole: the champion is never lost to a crash mid-write.
        _write_json(
            self.root / name / ALIASES,
            {
                CHAMPION: aliases.champion,
                CHALLENGER: aliases.challenger,
                "previous": list(aliases.previous),
            },
        )

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        # Read-modify-write of the aliases under an exclusive lock: the daemon's retrainer
        # and an operator's `--mode models` may move them at the same moment.
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / ".aliases.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def set_challenger(self, name: str, version: str | None) -> None:
        """Point `challenger` at `version` (None clears it)."""
        if version is not None:
            self.path(name, version)
        with self._locked(name):
            self._store(name, replace(self.aliases(name), challenger=version))
        log.info("model_alias_moved", name=name, alias=CHALLENGER, version=version)

    def promote(self, name: str, version: str) -> Aliases:
        """Make `version` the champion; the old champion goes on the rollback stack."""
        self.path(name, version)
        with self._locked(name):
            current = self.aliases(name)
            if current.champion == version:
                return current
            previous = current.previous
            if current.champion is not None:
                previous = (*previous, current.champion)
            challenger = None if current.challenger == version else current.challenger
            updated = Aliases(champion=version, challenger=challenger, previous=previous)
            self._store(name, updated)
        log.info("model_promoted", name=name, version=version, replaced=current.champion)
        return updated

    def rollback(self, name: str) -> Aliases:
        """Restore the previous champion.

        Raises:
            DataError: there is no earlier champion to go back to.
        """
        with self._locked(name):
            current = self.aliases(name)
            if not current.previous:
                raise DataError(f"{name}: no previous champion to roll back to")
            *rest, restored = current.previous
            updated = Aliases(
                champion=restored, challenger=current.challenger, previous=tuple(rest)
            )
            self._store(name, updated)
        log.warning("model_rolled_back", name=name, version=restored, replaced=current.champion)
        return updated

    # -- Views ---------------------------------------------------------------------------------

    def describe(self, name: str) -> dict[str, Any]:
        """Return one model's aliases, version count and champion figures, for the operator."""
        aliases = self.aliases(name)
        out: dict[str, Any] = {
            "name": name,
            CHAMPION: aliases.champion,
            CHALLENGER: aliases.challenger,
            "previous": list(aliases.previous),
            "versions": len(self.versions(name)),
        }
        for alias, version in ((CHAMPION, aliases.champion), (CHALLENGER, aliases.challenger)):
            if version is None:
                continue
            try:
                manifest = self.manifest(name, version)
            except DataError:
                continue
            out[f"{alias}_kind"] = manifest.kind
            out[f"{alias}_validation"] = dict(manifest.validation)
        return out

    def describe_all(self) -> list[dict[str, Any]]:
        """Return `describe` for every registered model name."""
        return [self.describe(name) for name in self.names()]


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True, default=_plain))


def _plain(value: Any) -> Any:
    # numpy scalars in metrics become plain numbers.
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- Training datasets -----------------------------------------------------------------------


class FeatureCache:
    """Training datasets materialised as Parquet, keyed by feature set and data range.

    `<root>/<feature_set>/<key>.parquet`, where the key hashes the feature set's parameters,
    the pair, the first and last candle and the candles' content: the next retrain on the
    same candles reads the file instead of recomputing it; a corrected candle changes the
    key. Files are written to a temporary name and renamed, so a reader never sees half.

    Args:
        root: the features directory (`<data_dir>/features`).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def key(
        self, feature_set: str, params: Mapping[str, Any], pair: str, frame: pd.DataFrame
    ) -> str:
        """Return the cache key of a dataset built from `frame` with these parameters."""
        import hashlib

        digest = hashlib.sha256()
        digest.update(json.dumps([feature_set, dict(params), pair], sort_keys=True).encode())
        if len(frame):
            digest.update(f"{frame.index[0]}|{frame.index[-1]}|{len(frame)}".encode())
            digest.update(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
        return digest.hexdigest()[:24]

    def path(self, feature_set: str, key: str) -> Path:
        """Return the Parquet file of one dataset."""
        return self.root / feature_set / f"{key}.parquet"

    def dataset(
        self,
        feature_set: str,
        params: Mapping[str, Any],
        pair: str,
        frame: pd.DataFrame,
        build: Any,
    ) -> pd.DataFrame:
        """Return `build(frame)`, read from the cache when this exact dataset was built before."""
        key = self.key(feature_set, params, pair, frame)
        path = self.path(feature_set, key)
        if path.is_file():
            try:
                cached = pd.read_parquet(path)
            except (OSError, ValueError) as e:  # a damaged file is rebuilt, not trusted
                log.warning("features_cache_unreadable", path=str(path), error=repr(e))
            else:
                self.hits += 1
                log.info("features_cache_hit", feature_set=feature_set, pair=pair, key=key)
                return cached
        built: pd.DataFrame = build(frame)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            built.to_parquet(tmp, compression="zstd")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.misses += 1
        log.info(
            "features_cache_stored", feature_set=feature_set, pair=pair, key=key, rows=len(built)
        )
        return built
