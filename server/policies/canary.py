"""The live A/B test of a canary: a share of users get the candidate, their verdicts are compared with those of the
promoted policy's users over the same period, and always-valid tests decide.

A candidate that passed the offline gate answers ``--canary-share`` of the served name's users (sticky per user,
:mod:`alignd.policies.router`). Every ``--canary-check-s`` the experiment reads, per version, since it started: the
users' labels (thumbs, ratings: the good rate), blind side-by-side picks between the two (the canary's win rate),
requests and failures (the error rate), and milliseconds per generated token. Then, at ``1 - --canary-confidence``:
- a failure rate conclusively higher than the promoted policy's, or replies slower than ``--canary-max-latency-ratio``
  times its (once both have ``--canary-min-completions``), rejects it;
- a good rate or win rate conclusively lower rejects it, one conclusively higher (and neither lower) promotes it;
- past ``--canary-max-s`` or ``--canary-max-requests`` without a conclusion, it is rejected: no gain was shown.
The rates' bounds are confidence sequences (:mod:`alignd.policies.sequential`), valid however often they are looked
at; α is split between the two signals (each α/2). The experiment's record lives in the canary's row
(``metrics.canary``), so a restart resumes it from the database.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from alignd.config import TrainerSettings
from alignd.errors import Conflict
from alignd.metrics import Metrics
from alignd.policies.registry import PolicyRegistry
from alignd.policies.sequential import compare_rates, rate_sequence
from alignd.protocol import Policy, PolicyEvaluation
from alignd.store import Fence, Store

__all__ = ["CanaryConfig", "CanaryExperiment", "Verdict", "VersionFigures", "judge_canary"]

log = logging.getLogger(__name__)

HISTORY_POINTS = 500
"""Most points of the experiment's figures over time kept in its record (older ones thinned out)."""


@dataclass(frozen=True)
class CanaryConfig:
    """How canaries are run (the ``--canary-*`` settings)."""

    share: float = 0.1
    """Share of users a candidate that passed the gate answers; 0 promotes it at once, without a live test."""
    confidence: float = 0.95
    """1 - the experiment's overall error rate."""
    max_s: float = 86_400.0
    """Time budget: a canary without a conclusion by then is rejected."""
    max_requests: int = 10_000
    """Traffic budget: requests the canary may answer without a conclusion."""
    check_s: float = 15.0
    """How often the figures are read and the tests applied."""
    min_completions: int = 30
    """Completions each side needs before error rates and latency are compared."""
    max_latency_ratio: float = 1.5
    """A canary slower than this many times the promoted policy, per generated token, is rejected."""
    side_by_side: bool = False
    """Whether a canary's requests for several choices are blind side-by-sides of it and the promoted version."""

    @classmethod
    def from_settings(cls, settings: TrainerSettings) -> CanaryConfig:
        return cls(share=settings.canary_share, confidence=settings.canary_confidence, max_s=settings.canary_max_s,
                   max_requests=settings.canary_max_requests, check_s=settings.canary_check_s,
                   min_completions=settings.canary_min_completions,
                   max_latency_ratio=settings.canary_max_latency_ratio,
                   side_by_side=settings.canary_side_by_side)


@dataclass
class VersionFigures:
    """What one version's users made of it during the experiment."""

    version: int
    requests: int = 0
    errors: int = 0
    completions: int = 0
    good: int = 0
    bad: int = 0
    wins: int = 0
    """Side-by-side picks of this version's reply over the other's."""
    losses: int = 0
    ms_per_token: float | None = None
    good_rate: float | None = None
    good_interval: tuple[float, float] | None = None
    """Always-valid bounds of the good rate at α/4 (its half of the good-rate comparison)."""
    win_rate: float | None = None
    win_interval: tuple[float, float] | None = None
    """Always-valid bounds of the win rate at α/2."""
    error_rate: float | None = None


@dataclass(frozen=True)
class Verdict:
    """What the tests conclude now: ``promote``, ``reject``, or None (go on)."""

    decision: Literal["promote", "reject"] | None
    reason: str


def judge_canary(canary: VersionFigures, promoted: VersionFigures, elapsed_s: float, config: CanaryConfig
                 ) -> Verdict:
    """Apply the experiment's tests (see the module docstring); fills the figures' rates and bounds."""
    alpha = 1.0 - config.confidence
    for figures in (canary, promoted):
        judged = figures.good + figures.bad
        figures.good_rate = figures.good / judged if judged else None
        figures.error_rate = figures.errors / figures.requests if figures.requests else None
    good, canary.good_interval, promoted.good_interval = compare_rates(
        canary.good, canary.good + canary.bad, promoted.good, promoted.good + promoted.bad, alpha / 2)
    picks = canary.wins + canary.losses
    canary.win_rate = canary.wins / picks if picks else None
    canary.win_interval = rate_sequence(canary.wins, picks, alpha / 2)
    wins = "higher" if canary.win_interval[0] > 0.5 else "lower" if canary.win_interval[1] < 0.5 else None

    enough = min(canary.completions, promoted.completions) >= config.min_completions
    errors, _, _ = compare_rates(canary.errors, canary.requests, promoted.errors, promoted.requests, alpha)
    if enough and errors == "higher":
        return Verdict("reject", f"error rate {canary.error_rate:.1%} against {promoted.error_rate or 0:.1%} for the "
                       "promoted policy: conclusively higher")
    if (enough and canary.ms_per_token and promoted.ms_per_token
            and canary.ms_per_token > config.max_latency_ratio * promoted.ms_per_token):
        return Verdict("reject", f"{canary.ms_per_token:.1f} ms per generated token against "
                       f"{promoted.ms_per_token:.1f} for the promoted policy (more than "
                       f"{config.max_latency_ratio:g}x)")
    lost = [name for name, verdict in (("good rate", good), ("side-by-side win rate", wins)) if verdict == "lower"]
    if lost:
        return Verdict("reject", f"users judged it worse: {' and '.join(lost)} conclusively lower "
                       f"({_rates(canary, promoted)})")
    won = [name for name, verdict in (("good rate", good), ("side-by-side win rate", wins)) if verdict == "higher"]
    if won:
        return Verdict("promote", f"users judged it better: {' and '.join(won)} conclusively higher "
                       f"({_rates(canary, promoted)})")
    if elapsed_s >= config.max_s or canary.requests >= config.max_requests:
        return Verdict("reject", f"no significant difference within the budget ({elapsed_s:.0f} s, "
                       f"{canary.requests} requests; {_rates(canary, promoted)})")
    return Verdict(None, f"no conclusion yet ({_rates(canary, promoted)})")


def _rates(canary: VersionFigures, promoted: VersionFigures) -> str:
    parts = []
    if canary.good + canary.bad or promoted.good + promoted.bad:
        parts.append(f"good rate {_pct(canary.good_rate)} vs {_pct(promoted.good_rate)} on "
                     f"{canary.good + canary.bad} and {promoted.good + promoted.bad} labels")
    if canary.wins + canary.losses:
        parts.append(f"win rate {_pct(canary.win_rate)} on {canary.wins + canary.losses} picks")
    return "; ".join(parts) or "no feedback yet"


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.0%}"


class CanaryExperiment:
    """Starts, checks and ends canaries; the registry does the loading and routing."""

    def __init__(self, registry: PolicyRegistry, store: Store, metrics: Metrics, config: CanaryConfig) -> None:
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.config = config
        self._base: tuple[int, dict[str, dict[str, int]]] | None = None
        """(version, requests and errors counted before this process took the experiment over)."""
        self._lock = asyncio.Lock()

    # --- operator and trainer calls ---------------------------------------------------------------------------

    async def start(self, version: int, share: float | None = None, reason: str = "put on canary by an operator",
                    side_by_side: bool | None = None, fence: Fence | None = None) -> Policy:
        """Put candidate ``version`` on canary at ``share`` (default: ``--canary-share``), or change the running
        canary's share; ``side_by_side`` (default: ``--canary-side-by-side``) makes requests for several choices
        blind comparisons of the canary and the promoted version. ``fence``: a trainer's run's (see
        :meth:`PolicyRegistry.start_canary`)."""
        share = self.config.share if share is None else share
        side_by_side = self.config.side_by_side if side_by_side is None else side_by_side
        if not 0 < share < 1:
            raise Conflict(f"--canary-share is {share}: a canary needs a share in (0, 1).", param="share",
                           code="canary_disabled")
        async with self._lock:
            running = self.registry.router.canary
            fresh = running is None or running.version != version
            figures: dict[str, Any] = {}
            if fresh:
                figures = {"started": datetime.now(UTC).isoformat(), "parent": self.registry.router.promoted,
                           "requests": {}, "errors": {}, "history": [], "decision": None}
            policy = await self.registry.start_canary(version, share, reason, figures, side_by_side, fence)
            if fresh:
                self._base = (version, {"requests": {}, "errors": {}})
            return policy

    async def promote(self, version: int, reason: str = "promoted from canary by an operator") -> Policy:
        return await self._end(version, "promoted", reason)

    async def reject(self, version: int, reason: str = "rejected from canary by an operator") -> Policy:
        return await self._end(version, "rejected", reason)

    async def stop(self, version: int, reason: str = "canary stopped by an operator") -> Policy:
        return await self._end(version, "stopped", reason)

    async def _end(self, version: int, outcome: str, reason: str) -> Policy:
        await self.registry.get(version)  # 404 for an unknown version
        async with self._lock:
            self.registry.canary_version(version)  # 409 before anything else when it is not the canary
            record = await self._figures(version)
            record["decision"] = {"outcome": outcome, "reason": reason, "at": datetime.now(UTC).isoformat()}
            policy = await self.registry.end_canary(version, outcome, reason, record)
            self._base = None
            return policy

    # --- figures ----------------------------------------------------------------------------------------------

    async def _figures(self, version: int) -> dict[str, Any]:
        """The experiment's record now: both versions' figures, the verdict so far and the history (also
        published in /metrics)."""
        row = await self.store.get_policy(version)
        record = dict((row.metrics.get("canary") if row else None) or {})
        started = datetime.fromisoformat(record["started"]) if record.get("started") else datetime.now(UTC)
        parent = self.registry.router.promoted
        if self._base is None or self._base[0] != version:  # taking over (a restart): counts so far are the base
            self._base = (version, {"requests": dict(record.get("requests") or {}),
                                    "errors": dict(record.get("errors") or {})})
        base, tally = self._base[1], self.registry.router.tally
        outcomes = await self.store.version_outcomes([version, parent], started)
        sides = []
        for v in (version, parent):
            out = outcomes[v]
            figures = VersionFigures(
                version=v, requests=int(base["requests"].get(str(v), 0)) + tally.requests.get(v, 0),
                errors=int(base["errors"].get(str(v), 0)) + tally.errors.get(v, 0),
                completions=int(out["completions"]), good=int(out["good"]), bad=int(out["bad"]),
                wins=int(out["side_by_side_wins"]), losses=int(out["side_by_side_losses"]),
                ms_per_token=out["latency_ms"] / out["completion_tokens"] if out["completion_tokens"] else None)
            sides.append(figures)
        canary, promoted = sides
        elapsed = (datetime.now(UTC) - started).total_seconds()
        verdict = judge_canary(canary, promoted, elapsed, self.config)
        history = list(record.get("history") or [])
        history.append({"at": datetime.now(UTC).isoformat(), "elapsed_s": round(elapsed, 1),
                        "good_rate": canary.good_rate, "good_interval": canary.good_interval,
                        "promoted_good_rate": promoted.good_rate, "promoted_good_interval": promoted.good_interval,
                        "win_rate": canary.win_rate, "win_interval": canary.win_interval,
                        "requests": canary.requests})
        if len(history) > HISTORY_POINTS:
            history = history[::2]
        record.update(requests={str(f.version): f.requests for f in sides},
                      errors={str(f.version): f.errors for f in sides}, canary=asdict(canary),
                      promoted=asdict(promoted), verdict=asdict(verdict), history=history,
                      elapsed_s=round(elapsed, 1))
        self._publish(canary, promoted)
        return record

    def _publish(self, canary: VersionFigures, promoted: VersionFigures) -> None:
        for figures in (canary, promoted):
            v = str(figures.version)
            for signal in ("good", "bad", "wins", "losses"):
                self.metrics.version_feedback.labels(v, signal).set(getattr(figures, signal))
            for name, value, bounds in (("good_rate", figures.good_rate, figures.good_interval),
                                        ("win_rate", figures.win_rate, figures.win_interval)):
                if value is not None:
                    self.metrics.canary_rate.labels(v, name).set(value)
                if bounds is not None:
                    self.metrics.canary_rate.labels(v, f"{name}_low").set(bounds[0])
                    self.metrics.canary_rate.labels(v, f"{name}_high").set(bounds[1])

    async def live(self, version: int) -> dict[str, Any] | None:
        """The running experiment's record now, without deciding (the evaluation endpoint); None when ``version``
        is not the canary."""
        canary = self.registry.router.canary
        if canary is None or canary.version != version:
            return None
        async with self._lock:
            return await self._figures(version)

    async def evaluation(self, version: int) -> PolicyEvaluation:
        """The offline gate's decision (from the run that produced ``version``) and the live test's record (now,
        while it runs)."""
        policy = await self.registry.get(version)  # 404 for an unknown version
        row = await self.store.get_policy(version)
        metrics = row.metrics if row is not None else {}
        offline = None
        if policy.run_id is not None and (run := await self.store.get_run(policy.run_id)) is not None:
            offline = run.metrics.get("gate")
        if offline is None and version:  # the run's row is gone: the figures the registry kept
            offline = {k: v for k, v in metrics.items() if k not in ("canary", "sha256")} or None
        live = await self.live(version) or metrics.get("canary")
        return PolicyEvaluation(version=version, status=policy.status, offline=offline, live=live)

    # --- the loop ---------------------------------------------------------------------------------------------

    async def check(self) -> Verdict | None:
        """Read the running canary's figures, record them, and promote or reject it when the tests conclude."""
        canary = self.registry.router.canary
        if canary is None:
            return None
        async with self._lock:
            if self.registry.router.canary is None or self.registry.router.canary.version != canary.version:
                return None
            record = await self._figures(canary.version)
            verdict = Verdict(**{k: record["verdict"][k] for k in ("decision", "reason")})
            if verdict.decision is None:
                row = await self.store.get_policy(canary.version)
                if row is not None:
                    await self.store.update_policy(canary.version, metrics={**row.metrics, "canary": record})
                return verdict
            record["decision"] = {"outcome": "promoted" if verdict.decision == "promote" else "rejected",
                                  "reason": verdict.reason, "at": datetime.now(UTC).isoformat(), "automatic": True}
            outcome = "promoted" if verdict.decision == "promote" else "rejected"
            await self.registry.end_canary(canary.version, outcome, f"canary {outcome}: {verdict.reason}", record)
            self._base = None
            log.info("canary %d %s: %s", canary.version, outcome, verdict.reason)
            return verdict

    async def run(self) -> None:
        """Check every ``check_s`` for as long as the server runs; a failed check is logged and retried."""
        while True:
            await asyncio.sleep(self.config.check_s)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checking the canary failed; retrying in %.0f s", self.config.check_s)
