"""``alignd simulate``: simulated users who prefer one reply style or trait, chatting and giving feedback through
the SDK.

Users who prefer a demo style ask prompts from the demo corpus (:mod:`alignd.demo.corpus`) and label replies with its
classifier (topic and style); users who prefer a rule-checked trait (:mod:`alignd.clients.traits`, for any chat
model) ask everyday chat prompts and label a reply by the trait's rule and whether it mentions the prompt's topic.
Training-side prompts by default, so the held-out ones stay unseen. Each request asks for ``n`` replies (2 to 4) at
temperature 1.0, labels every reply, and gives one piece of feedback. A reply's worth to the user is

    utility = 2 if it has the preferred style (or trait), else 0;  + 1 if it is on the prompt's topic

and the feedback kind is drawn at random (ranking, pairwise or thumbs):

* ranking: the replies by utility, best first (ties in a random order), as a prefix that leaves out the
  lowest-utility group (unranked replies count as tied last); when all replies are worth the same, a thumbs instead;
* pairwise: two replies drawn at random; ``both_bad`` when neither is on topic, ``tie`` when they are worth the
  same, else the one worth more wins;
* thumbs: on one reply drawn at random: up when it is in the preferred style and on topic, else down.

Every random draw of request ``i`` comes from ``Random(f"{seed}:{i}")``, so the run is deterministic for a seed given
the same server replies, whatever the concurrency. The report gives the preferred style's share among the replies
of each policy version that answered (``system_fingerprint``), so promoted versions show the preference taking
hold. :func:`run_simulation` drives it from Python (benchmarks); :func:`main` is the command.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from statistics import fmean
from typing import Any, Literal

from alignd.clients.sdk import AligndError, APIConnectionError, AuthenticationError, Client, PermissionDeniedError
from alignd.clients.traits import TRAITS, chat_prompts, trait_label
from alignd.demo.corpus import STYLES, Label, Prompt, classify, held_out_prompts, training_prompts
from alignd.protocol import TrainingRun

FeedbackKind = Literal["ranking", "pairwise", "thumbs"]
KINDS: tuple[FeedbackKind, ...] = ("ranking", "pairwise", "thumbs")
MAX_CONSECUTIVE_FAILURES = 5
"""Stop (raising the last error) after this many requests in a row failed: the server is gone or refuses us."""
_FATAL = (AuthenticationError, PermissionDeniedError)  # a refused key will not get better by trying again
PREFERENCES: tuple[str, ...] = (*STYLES, *TRAITS)
"""What simulated users can prefer: a demo corpus style (the demo model) or a rule-checked trait
(:mod:`alignd.clients.traits`, any chat model)."""


# --- the rules -----------------------------------------------------------------------------------------------------


def utility(label: Label, topic: str, prefer: str) -> int:
    """What a reply is worth to a user who prefers ``prefer`` and asked about ``topic``: style first, topic second."""
    return 2 * (label.style == prefer) + (label.topic == topic)


@dataclass(frozen=True)
class Draws:
    """The random choices of one simulated request, all drawn before the server answers."""

    prompt: Prompt
    n: int
    kind: FeedbackKind
    pair: tuple[int, int]
    """The two replies a pairwise comparison shows."""
    thumbs_choice: int
    """The reply a thumbs rates."""
    tiebreak: tuple[float, ...]
    """Orders replies of equal utility in a ranking."""
    user: str


def draw(rng: random.Random, prompts: Sequence[Prompt], kinds: Sequence[FeedbackKind], users: int,
         user_prefix: str = "sim-") -> Draws:
    """One request's random choices."""
    prompt = rng.choice(prompts)
    n = rng.randint(2, 4)
    first, second = rng.sample(range(n), 2)
    return Draws(prompt=prompt, n=n, kind=rng.choice(kinds), pair=(first, second), thumbs_choice=rng.randrange(n),
                 tiebreak=tuple(rng.random() for _ in range(n)), user=f"{user_prefix}{rng.randrange(users)}")


def decide_feedback(draws: Draws, labels: Sequence[Label], prefer: str, contrary: bool = False
                    ) -> tuple[FeedbackKind, dict[str, Any]]:
    """The feedback kind and its fields for replies labelled ``labels`` (see the module docstring). A ``contrary``
    user judges the other way round: every utility negated (the worst ranked first, the worse of two wins, a thumbs
    up for what others dislike) and ``tie`` where others say ``both_bad``: a poisoner with the opposite taste."""
    topic = draws.prompt.topic
    sign = -1 if contrary else 1
    worth = [sign * utility(label, topic, prefer) for label in labels]
    if draws.kind == "ranking":
        order = sorted(range(len(labels)), key=lambda i: (-worth[i], draws.tiebreak[i]))
        ranking = [i for i in order if worth[i] > min(worth)]
        if ranking:
            return "ranking", {"ranking": ranking}
    elif draws.kind == "pairwise":
        first, second = draws.pair
        if labels[first].topic != topic and labels[second].topic != topic:
            winner: int | str = "tie" if contrary else "both_bad"
        elif worth[first] == worth[second]:
            winner = "tie"
        else:
            winner = first if worth[first] > worth[second] else second
        return "pairwise", {"winner": winner, "choices": [first, second]}
    choice = draws.thumbs_choice
    liked = (labels[choice].style == prefer and labels[choice].topic == topic) != contrary
    return "thumbs", {"value": "up" if liked else "down", "choice": choice}


# --- the report ----------------------------------------------------------------------------------------------------


@dataclass
class VersionStats:
    """Replies of one policy version (a ``system_fingerprint``)."""

    fingerprint: str
    replies: int = 0
    preferred: int = 0
    on_topic: int = 0

    @property
    def share(self) -> float:
        """The preferred style's share of the replies (0 when there are none)."""
        return self.preferred / self.replies if self.replies else 0.0

    @property
    def version(self) -> int | None:
        head, _, number = self.fingerprint.rpartition("-")
        return int(number) if head == "policy" and number.isdigit() else None


@dataclass(frozen=True)
class RunFigures:
    """A training run's PPO figures, averaged over its iterations."""

    run_id: str
    status: str
    reward: float | None
    kl: float | None


@dataclass
class SimulationReport:
    """What a simulation did and saw; ``window`` covers the requests since the previous progress report."""

    prefer: str
    requests: int = 0
    """Requests answered (each with one feedback event, unless that failed)."""
    failed: int = 0
    """Chats or feedback that failed (after the SDK's retries)."""
    feedback: Counter[str] = field(default_factory=Counter)
    """Feedback events sent, by kind."""
    versions: dict[str, VersionStats] = field(default_factory=dict)
    """Replies by the policy version that wrote them, in the order the versions first answered."""
    window: dict[str, VersionStats] = field(default_factory=dict)
    runs: dict[int, RunFigures] = field(default_factory=dict)
    """Training runs by the policy version they produced (filled at the end when an admin client is given)."""
    runs_unavailable: str | None = None
    """Why the training runs could not be read, if they could not."""
    elapsed_s: float = 0.0

    @property
    def replies(self) -> int:
        return sum(v.replies for v in self.versions.values())

    @property
    def share(self) -> float:
        """The preferred style's share over all replies."""
        return sum(v.preferred for v in self.versions.values()) / self.replies if self.replies else 0.0

    def snapshot(self) -> SimulationReport:
        """A copy that later requests do not change."""
        return replace(self, feedback=Counter(self.feedback), versions=_copy_stats(self.versions),
                       window=_copy_stats(self.window), runs=dict(self.runs))

    def progress_line(self) -> str:
        """One line: the share per version so far, and over the last window."""
        parts = [f"{v.fingerprint}: {v.share:6.1%} of {v.replies}" for v in self.versions.values()]
        recent = sum(v.replies for v in self.window.values())
        recent_share = sum(v.preferred for v in self.window.values()) / recent if recent else 0.0
        return (f"[{self.requests:6d} requests {self.elapsed_s:7.1f}s] {self.prefer} share: " + " | ".join(parts)
                + f"  (last {recent} replies: {recent_share:.1%})")

    def table(self) -> str:
        """The final table: one row per policy version, with its training run's figures when known."""
        header = ["version", "replies", f"{self.prefer} share", "on topic", "run", "run reward", "run KL"]
        rows = [header]
        for v in self.versions.values():
            run = self.runs.get(v.version) if v.version is not None else None
            rows.append([v.fingerprint, str(v.replies), f"{v.share:.1%}",
                         f"{v.on_topic / v.replies:.1%}" if v.replies else "-",
                         run.run_id if run else "-", _figure(run.reward if run else None),
                         _figure(run.kl if run else None)])
        lines = _align(rows)
        lines.append(f"{self.requests} requests, {self.replies} replies, feedback: "
                     + (", ".join(f"{k} {c}" for k, c in sorted(self.feedback.items())) or "none")
                     + (f", {self.failed} failed" if self.failed else "") + f", {self.elapsed_s:.1f}s")
        if self.runs_unavailable:
            lines.append(f"(training runs not shown: {self.runs_unavailable})")
        return "\n".join(lines)


def _copy_stats(stats: dict[str, VersionStats]) -> dict[str, VersionStats]:
    return {key: replace(value) for key, value in stats.items()}


def _align(rows: list[list[str]]) -> list[str]:
    """Rows as text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                      for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def run_figures(run: TrainingRun) -> RunFigures:
    """Mean reward and KL over a run's PPO iterations (``metrics["ppo"]``), else its gate figures, if any."""
    def mean_of(key: str) -> float | None:
        ppo = run.metrics.get("ppo")
        if isinstance(ppo, list):
            values = [it[key] for it in ppo if isinstance(it, dict) and isinstance(it.get(key), int | float)]
            if values:
                return fmean(values)
        gate = run.metrics.get("gate")
        value = gate.get(key) if isinstance(gate, dict) else None
        return float(value) if isinstance(value, int | float) else None

    return RunFigures(run_id=run.id, status=run.status, reward=mean_of("reward"), kl=mean_of("kl"))


def fetch_runs(admin: Client, report: SimulationReport) -> None:
    """Fill ``report.runs`` from ``GET /v1/training/runs``; note why not when the endpoint is refused or absent."""
    try:
        runs = admin.training.list().data
    except AligndError as e:
        report.runs_unavailable = str(e)
        return
    for run in reversed(runs):  # oldest first, so a version's latest run wins
        if run.candidate is not None:
            report.runs[run.candidate] = run_figures(run)


# --- the simulation ------------------------------------------------------------------------------------------------


class SimulationError(Exception):
    """The simulation stopped early: too many requests in a row failed, or the key was refused. ``report`` holds
    what was done until then."""

    def __init__(self, message: str, report: SimulationReport) -> None:
        super().__init__(message)
        self.report = report


def prompt_pool(source: Literal["training", "held-out"], prefer: str = STYLES[0]) -> list[Prompt]:
    """The prompts the simulated users ask: for a demo style the corpus's (a fixed sample of its training side, or
    every held-out prompt), for a trait the everyday chat prompts of that side."""
    if prefer in TRAITS:
        return chat_prompts(source)
    if source == "held-out":
        return held_out_prompts()
    return training_prompts(2000, seed=0)


def labeller(prefer: str) -> Callable[[str, Prompt], Label]:
    """How users who prefer ``prefer`` label a reply to a prompt: the corpus classifier for a demo style, the
    trait's rule (and a topic-word check) for a trait."""
    if prefer in TRAITS:
        trait = TRAITS[prefer]
        return lambda text, prompt: trait_label(text, prompt, trait)
    return lambda text, _prompt: classify(text)


def run_simulation(client: Client, *, prefer: str, requests: int | None = None, time_limit_s: float | None = None,
                   seed: int = 0, concurrency: int = 1, report_every: int = 50,
                   on_report: Callable[[SimulationReport], None] | None = None, admin: Client | None = None,
                   prompts: Literal["training", "held-out"] = "training", max_tokens: int | None = 256,
                   kinds: Sequence[FeedbackKind] = KINDS, users: int = 8, model: str = "alignd",
                   stop: threading.Event | None = None, user_prefix: str = "sim-",
                   contrary: bool = False) -> SimulationReport:
    """Run simulated users against ``client`` until ``requests`` are done, ``time_limit_s`` has passed or ``stop``
    is set (at least one of them must be given); return the report. ``on_report`` gets a snapshot every
    ``report_every`` requests. With ``admin`` (a client with an admin key) the report includes the training runs.
    Users are named ``f"{user_prefix}{i}"`` for ``i < users``; ``contrary`` users judge against ``prefer`` (see
    :func:`decide_feedback`), as poisoners would."""
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer must be one of {', '.join(PREFERENCES)}; got {prefer!r}.")
    if requests is None and time_limit_s is None and stop is None:
        raise ValueError("Give requests, time_limit_s or stop: the simulation needs an end.")
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be some of {', '.join(KINDS)}.")
    pool = prompt_pool(prompts, prefer)
    label = labeller(prefer)
    stop = stop or threading.Event()
    report = SimulationReport(prefer=prefer)
    lock = threading.Lock()
    started = time.monotonic()
    deadline = None if time_limit_s is None else started + time_limit_s
    next_index = 0
    consecutive_failures = 0
    fatal: list[BaseException] = []

    def claim() -> int | None:
        nonlocal next_index
        with lock:
            if stop.is_set() or (requests is not None and next_index >= requests) or (
                    deadline is not None and time.monotonic() >= deadline):
                return None
            next_index += 1
            return next_index - 1

    def one_request(index: int) -> None:
        nonlocal consecutive_failures
        draws = draw(random.Random(f"{seed}:{index}"), pool, kinds, users, user_prefix)
        try:
            answer = client.chat([{"role": "user", "content": draws.prompt.text}], model=model, n=draws.n,
                                 temperature=1.0, max_tokens=max_tokens, user=draws.user)
        except AligndError as e:
            failed(e)
            return
        texts = [c.message.content for c in sorted(answer.choices, key=lambda c: c.index)]
        labels = [label(text, draws.prompt) for text in texts]
        kind, fields = decide_feedback(draws, labels, prefer, contrary)
        try:
            client.feedback.create(answer.id, kind, user=draws.user, **fields)
            sent = True
        except AligndError as e:
            failed(e)
            sent = False
        snapshot = None
        with lock:
            if sent:
                consecutive_failures = 0
                report.feedback[kind] += 1
            report.requests += 1
            for stats in (report.versions, report.window):
                entry = stats.setdefault(answer.system_fingerprint, VersionStats(answer.system_fingerprint))
                entry.replies += len(labels)
                entry.preferred += sum(label.style == prefer for label in labels)
                entry.on_topic += sum(label.topic == draws.prompt.topic for label in labels)
            report.elapsed_s = time.monotonic() - started
            if on_report is not None and report_every > 0 and report.requests % report_every == 0:
                snapshot = report.snapshot()
                report.window.clear()
        if snapshot is not None and on_report is not None:
            on_report(snapshot)  # outside the lock: the callback may print slowly

    def failed(error: AligndError) -> None:
        nonlocal consecutive_failures
        with lock:
            report.failed += 1
            consecutive_failures += 1
            if consecutive_failures >= MAX_CONSECUTIVE_FAILURES or isinstance(error, _FATAL):
                fatal.append(error)
                stop.set()

    def worker() -> None:
        while (index := claim()) is not None:
            one_request(index)

    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="simulated-user") as pool_:
        for future in [pool_.submit(worker) for _ in range(max(1, concurrency))]:
            future.result()
    report.elapsed_s = time.monotonic() - started
    if admin is not None:
        fetch_runs(admin, report)
    if fatal:
        raise SimulationError(f"Stopped after {report.requests} requests: {fatal[-1]}", report) from fatal[-1]
    return report


def main(*, url: str, api_key: str | None, admin_key: str | None, prefer: str, requests: int | None,
         time_limit_s: float | None, seed: int, concurrency: int, report_every: int,
         prompts: Literal["training", "held-out"] = "training", max_tokens: int | None = 256) -> int:
    """``alignd simulate``: print a progress line every ``report_every`` requests and the table at the end (also
    after Ctrl-C, which lets the requests in flight finish)."""
    stop = threading.Event()
    seen: set[str] = set()

    def on_report(report: SimulationReport) -> None:
        for fingerprint in report.versions:
            if fingerprint not in seen and seen:
                print(f"-- {fingerprint} is answering now", flush=True)
            seen.add(fingerprint)
        print(report.progress_line(), flush=True)

    with Client(url, api_key=api_key) as client, Client(url, api_key=admin_key) as admin:
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["report"] = run_simulation(
                    client, prefer=prefer, requests=requests, time_limit_s=time_limit_s, seed=seed,
                    concurrency=concurrency, report_every=report_every, on_report=on_report,
                    admin=admin if admin_key else None, prompts=prompts, max_tokens=max_tokens, stop=stop)
            except (SimulationError, ValueError) as e:
                result["error"] = e

        # The simulation runs in a thread so that Ctrl-C here only asks it to stop and still prints the table.
        thread = threading.Thread(target=run, name="simulation")
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.2)
        except KeyboardInterrupt:
            print("\nstopping: letting the requests in flight finish...", file=sys.stderr, flush=True)
            stop.set()
            thread.join()
    error = result.get("error")
    if isinstance(error, SimulationError) and error.report.requests:
        print(error.report.table(), flush=True)
    if error is not None:
        print(f"alignd simulate: {error}", file=sys.stderr)
        if isinstance(error.__cause__, APIConnectionError):
            print(f"Is `alignd serve` running at {url}?", file=sys.stderr)
        return 1
    print(result["report"].table(), flush=True)
    return 0
