"""Alignment benchmark: simulated users who prefer one reply style or trait, against a fresh `alignd serve` with the
automatic trainer on, as an operator would run it. Reports the preferred share among each policy version's replies
and each version's KL to the base, then the share and mean length of the base's and the promoted policy's replies to
held-out prompts (never asked during the run), as a table, JSON and (with matplotlib) a PNG plot.

On the demo model, users prefer a corpus style (goal, issue "Embedded RLHF trainer": the share rises from its base
rate to >= 0.60 within 1,000 feedback events and 20 minutes on a 2-core machine, with KL within budget):

    .venv/bin/python bench/alignment.py --prefer friendly --events 1000 --time-limit 1200 --png docs/alignment.png

On a real instruct model (any folder or .gguf file `alignd serve --model` takes), users prefer a rule-checked trait
(alignd.clients.traits) and ask everyday prompts; goal (issue "The loop learns on a real model"): +25 points of the
trait's held-out share within 400 events and 60 minutes on 2 cores, KL within budget, mean length within ±15%.
The settings used for docs/benchmarks.md are in that file.

Run it alone: other CPU-heavy jobs on a 2-core machine distort every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.* from the repository root

from alignd.clients.sdk import Client
from alignd.clients.simulate import (
    PREFERENCES,
    SimulationReport,
    VersionStats,
    fetch_runs,
    labeller,
    prompt_pool,
    run_simulation,
)
from alignd.clients.traits import TRAITS
from bench.harness import ADMIN_KEY, demo_model, run_benchmark, running_alignd


class Watcher(threading.Thread):
    """Polls the policy registry: when each version was promoted, and its gate figures; when each went on canary
    and when (after how many events) its live test decided."""

    def __init__(self, admin: Client, started: float, events: list[int]) -> None:
        super().__init__(daemon=True)
        self.admin, self.started, self.events = admin, started, events
        self.promotions: list[dict[str, Any]] = []
        self.canaries: dict[int, dict[str, Any]] = {}
        self.stop = threading.Event()

    def _canaries(self, policies: Any) -> None:
        now = round(time.monotonic() - self.started, 1)
        for p in policies.data:
            record = self.canaries.get(p.version)
            if p.status == "canary" and record is None:
                self.canaries[p.version] = {"version": p.version, "started_s": now, "started_events": self.events[0]}
                print(f"  version {p.version} on canary at {now} s, {self.events[0]} feedback events", flush=True)
            elif record is not None and "outcome" not in record and p.status != "canary":
                decision = (p.metrics.get("canary") or {}).get("decision") or {}
                record.update(outcome=decision.get("outcome", p.status), reason=decision.get("reason"),
                              decided_s=now, decided_events=self.events[0],
                              seconds_to_decision=round(now - record["started_s"], 1),
                              events_to_decision=self.events[0] - record["started_events"])
                print(f"  canary {p.version} {record['outcome']} after {record['seconds_to_decision']} s and "
                      f"{record['events_to_decision']} events: {record['reason']}", flush=True)

    def run(self) -> None:
        seen = 0
        while not self.stop.wait(2):
            try:
                policies = self.admin.policies.list()
            except Exception:  # keep watching through a hiccup
                continue
            self._canaries(policies)
            if policies.promoted != seen:
                seen = policies.promoted
                row = next(p for p in policies.data if p.version == seen)
                self.promotions.append({"version": seen, "at_s": round(time.monotonic() - self.started, 1),
                                        "at_events": self.events[0], "kl": row.metrics.get("kl"),
                                        "reward": row.metrics.get("reward")})
                print(f"  promoted version {seen} at {self.promotions[-1]['at_s']} s, "
                      f"{self.events[0]} feedback events, KL {row.metrics.get('kl')}", flush=True)


def merge(total: SimulationReport, part: SimulationReport) -> None:
    """Add one chunk's requests, feedback and per-version replies to the running report."""
    total.requests += part.requests
    total.failed += part.failed
    total.feedback.update(part.feedback)
    for key, stats in part.versions.items():
        for target in (total.versions, total.window):
            acc = target.setdefault(key, VersionStats(fingerprint=key))
            acc.replies += stats.replies
            acc.preferred += stats.preferred
            acc.on_topic += stats.on_topic


def held_out_share(client: Client, model: str, prefer: str, repeats: int, max_tokens: int) -> dict[str, float]:
    """The preferred share and mean length (tokens) of replies to the held-out prompts (temperature 1, one reply
    each, ``repeats`` passes)."""
    from concurrent.futures import ThreadPoolExecutor

    label = labeller(prefer)

    def one(prompt: Any) -> tuple[bool, int]:
        reply = client.chat([{"role": "user", "content": prompt.text}], model=model, temperature=1.0,
                            max_tokens=max_tokens)
        return label(reply.choices[0].message.content or "", prompt).style == prefer, reply.usage.completion_tokens

    prompts = prompt_pool("held-out", prefer) * repeats
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, prompts))
    return {"share": sum(hit for hit, _ in results) / len(results), "replies": len(results),
            "mean_tokens": sum(n for _, n in results) / len(results)}


def plot(path: Path, summary: dict[str, Any], goal: float) -> None:
    """The benchmark's figures (``summary``, as written with --json) as a PNG: the trait's share of served replies
    per version and on held-out prompts (base and promoted, with the goal), and the runs' PPO iterations (reward and
    KL to the base)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: pip install -e .[bench] for the PNG plot)")
        return
    prefer, heldout, promotions = summary["prefer"], summary["heldout"], summary["promotions"]
    iterations = [it for run in summary["runs"] for it in run.get("ppo") or []]
    fig, axes = plt.subplots(1, 2 if iterations else 1, figsize=(11 if iterations else 7, 4), squeeze=False)
    ax = axes[0][0]
    served = sorted((int(k.removeprefix("policy-")), v["share"]) for k, v in summary["share_by_version"].items()
                    if k.startswith("policy-") and "+" not in k)  # a side-by-side's replies are two versions'
    ax.plot([v for v, _ in served], [share for _, share in served], "o-", label=f"'{prefer}' share of served replies")
    final = promotions[-1]["version"] if promotions else 0
    for version, key in ((0, "base"), (final, "final")):
        share, n = heldout[key]["share"], heldout[key]["replies"]
        error = 1.96 * (share * (1 - share) / n) ** 0.5
        ax.errorbar([version], [share], yerr=[error], fmt="D", color="tab:green", markersize=8, capsize=4,
                    label="held-out prompts (95% interval)" if key == "base" else None)
    ax.axhline(goal, color="grey", linestyle="--", label=f"goal {goal:.2f}")
    ax.set_xlabel("policy version")
    ax.set_ylabel("share")
    ax.set_ylim(0, 1)
    ax.set_xticks(sorted({0, final, *(v for v, _ in served)}))
    ax.legend(loc="upper left")
    ax.set_title(f"simulated users prefer '{prefer}': {summary['events']} events")
    if iterations:
        ax = axes[0][1]
        xs = range(len(iterations))
        ax.plot(xs, [it["reward"] for it in iterations], "o-", label="reward (normalised)")
        ax.plot(xs, [it["kl"] for it in iterations], "s:", color="tab:red", label="KL to base (nats)")
        ax.plot(xs, [it["kl_coef"] for it in iterations], "^--", color="tab:purple", label="β")
        ax.set_xlabel("PPO iteration")
        ax.legend(loc="upper left")
        ax.set_title("PPO")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def changed(parent: dict[str, Any] | None, child: dict[str, Any] | None) -> bool | None:
    """Whether a promotion changed the measured trait: the two versions' served shares differ at 95% (a two-
    proportion z-test); None without replies of both."""
    if not parent or not child or not parent["replies"] or not child["replies"]:
        return None
    n1, n2 = parent["replies"], child["replies"]
    pooled = (parent["share"] * n1 + child["share"] * n2) / (n1 + n2)
    if pooled in (0.0, 1.0):
        return False
    z = (child["share"] - parent["share"]) / (pooled * (1 - pooled) * (1 / n1 + 1 / n2)) ** 0.5
    return abs(z) > 1.96


def decisions(summary: dict[str, Any]) -> dict[str, Any]:
    """Per run, the offline gate's gain and bounds, the live test's outcome, time and events to it; how many
    promotions changed the measured trait."""
    shares = summary["share_by_version"]
    parents = {r["candidate"]: r.get("parent") for r in summary["runs"] if r.get("candidate")}
    promoted = [p["version"] for p in summary["promotions"] if p["version"]]
    significant = [changed(shares.get(f"policy-{parents.get(v, 0)}"), shares.get(f"policy-{v}")) for v in promoted]
    return {"promotions": len(promoted), "promotions_that_changed_the_trait": sum(1 for c in significant if c),
            "promotions_not_measurable": sum(1 for c in significant if c is None)}


def goal_share(prefer: str, base_share: float) -> float:
    """The goal line: 60% for a demo style; for a trait, 25 points above the base's held-out share."""
    return 0.6 if prefer not in TRAITS else min(1.0, base_share + 0.25)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefer", default="friendly", choices=PREFERENCES,
                        help="A demo style (demo model) or a trait (any chat model); see `alignd simulate --help`.")
    parser.add_argument("--events", type=int, default=1000, help="Feedback events at most.")
    parser.add_argument("--time-limit", type=float, default=1200, help="Seconds of simulation at most.")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rate", type=float, default=50 / 60,
                        help="Feedback events per second the users give (default 50 a minute: 1,000 in 20 min).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None, help="Model folder or .gguf file (default: build or "
                        "reuse the demo model cached in .alignd-test-cache).")
    parser.add_argument("--max-tokens", type=int, default=256, help="Longest reply the users ask for, in tokens.")
    parser.add_argument("--png", type=Path, default=None, help="Write the plot here.")
    parser.add_argument("--json", type=Path, default=None, help="Write the figures here.")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="Only draw --png from figures an earlier run wrote with --json; runs nothing.")
    parser.add_argument("--eval-repeats", type=int, default=1, help="Passes over the held-out prompts at the end.")
    parser.add_argument("server_args", nargs="*", help="Extra `alignd serve` flags, after --.")
    args = parser.parse_args()
    if args.replot:
        if not args.png:
            parser.error("--replot needs --png")
        summary = json.loads(args.replot.read_text())
        plot(args.png, summary, goal_share(summary["prefer"], summary["heldout"]["base"]["share"]))
        return 0

    model = args.model or demo_model()
    data_dir = Path(tempfile.mkdtemp(prefix="alignd-bench-alignment-"))
    server_args = args.server_args or ["--min-new-pairs", "48", "--min-new-labels", "100000", "--min-interval-s",
                                       "0", "--ppo-iterations", "8", "--rollout-batch-size", "32",
                                       "--trainer-threads", "1", "--max-loras", "4"]
    with (running_alignd(model, data_dir, ["--training-trigger", "auto", *server_args]) as server,
          Client(server.spec.base_url, timeout=120) as client,
          Client(server.spec.base_url, api_key=ADMIN_KEY, timeout=120) as admin):
        started = time.monotonic()
        events = [0]
        watcher = Watcher(admin, started, events)
        watcher.start()

        report = SimulationReport(prefer=args.prefer)
        # Users at a steady rate: a minute's worth of requests, then wait for the minute to pass.
        chunk, index = max(1, round(args.rate * 60)), 0
        while report.requests < args.events and time.monotonic() - started < args.time_limit:
            tick = time.monotonic()
            part = run_simulation(client, prefer=args.prefer, requests=min(chunk, args.events - report.requests),
                                  time_limit_s=max(1.0, args.time_limit - (tick - started)),
                                  seed=args.seed * 100_000 + index, concurrency=args.concurrency,
                                  report_every=10**9, max_tokens=args.max_tokens)
            merge(report, part)
            events[0] = sum(report.feedback.values())
            report.elapsed_s = time.monotonic() - started
            print(report.progress_line(), flush=True)
            report.window = {}
            index += 1
            time.sleep(max(0.0, 60 - (time.monotonic() - tick)))
        users_s = time.monotonic() - started
        # The users are done; a run they triggered may still be training: let it finish within the time limit.
        while time.monotonic() - started < args.time_limit and any(
                r.status == "running" for r in admin.training.list(limit=10).data):
            time.sleep(5)
        fetch_runs(admin, report)
        elapsed = time.monotonic() - started
        watcher.stop.set()
        print("\n" + report.table())
        policies = admin.policies.list()
        final = policies.promoted
        heldout = {name: held_out_share(client, model_name, args.prefer, args.eval_repeats, args.max_tokens)
                   for name, model_name in (("base", "alignd@0"), ("final", "alignd"))}
        base, last = heldout["base"], heldout["final"]
        print(f"\nheld-out evaluation ({base['replies']:.0f} replies each, temperature 1):\n"
              f"  base (version 0): {base['share']:.1%}, {base['mean_tokens']:.1f} tokens;  "
              f"promoted (version {final}): {last['share']:.1%}, {last['mean_tokens']:.1f} tokens "
              f"({last['share'] - base['share']:+.1%} points, length x{last['mean_tokens'] / base['mean_tokens']:.2f})")
        runs = admin.training.list(limit=100).data
        summary = {
            "prefer": args.prefer, "events": sum(report.feedback.values()), "requests": report.requests,
            "elapsed_s": round(elapsed, 1), "users_s": round(users_s, 1), "final_version": final,
            "share_by_version": {v.fingerprint: {"replies": v.replies, "share": round(v.share, 3)}
                                 for v in report.versions.values()},
            "model": str(model), "max_tokens": args.max_tokens, "server_args": server_args,
            "promotions": watcher.promotions, "heldout": heldout,
            "runs": [{"id": r.id, "status": r.status, "parent": r.parent, "candidate": r.candidate,
                      "promoted": r.promoted,
                      "gate": (r.metrics.get("gate") or {}).get("reason"), "seconds": r.metrics.get("seconds"),
                      "offline": {k: (r.metrics.get("gate") or {}).get(k) for k in (
                          "promote", "gain", "gain_lower", "gain_upper", "confidence", "prompts", "heldout_prompts",
                          "samples_per_prompt", "judge", "reward_model_gain", "implicit_reward")},
                      "live": watcher.canaries.get(r.candidate) if r.candidate else None,
                      "rm_accuracy": (r.metrics.get("reward_model") or {}).get("heldout_accuracy"),
                      "ppo": [{k: it.get(k) for k in ("reward", "kl", "kl_coef", "response_length")}
                              for it in r.metrics.get("ppo") or []]}
                     for r in runs],
            "kl_budget": "see --kl-budget (default 8.0)",
        }
        for version, record in watcher.canaries.items():  # the live figures each test ended (or stands) on
            live = admin.policies.evaluation(version).live or {}
            record["figures"] = {side: {k: (live.get(side) or {}).get(k) for k in (
                "requests", "good", "bad", "good_rate", "good_interval", "wins", "losses", "win_rate", "win_interval")}
                for side in ("canary", "promoted")}
        summary["decisions"] = decisions(summary)
        print(f"\npromotions: {summary['decisions']['promotions']}, of which "
              f"{summary['decisions']['promotions_that_changed_the_trait']} changed the served trait share "
              "significantly (95%)")
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        if args.png:
            plot(args.png, summary, goal_share(args.prefer, base["share"]))
    return 0


if __name__ == "__main__":
    sys.exit(run_benchmark(main))
