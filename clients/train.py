"""``alignd train``: start a training run on a running server and follow it with a progress bar.

Exit status: 0 when the run succeeded, 1 when it failed or was cancelled, 2 when it could not be started.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from alignd.clients.sdk import AligndError, Client
from alignd.protocol import TrainingRun


def _bar(run: TrainingRun, width: int) -> str:
    filled = int(run.progress * width)
    figures = ""
    if run.metrics.get("ppo"):
        last = run.metrics["ppo"][-1]
        figures = f" reward {last['reward']:+.3f} kl {last['kl']:.3f}"
    return f"[{'#' * filled}{'.' * (width - filled)}] {run.progress:4.0%} {run.phase:<12}{figures}"


def follow(client: Client, run: TrainingRun, out: TextIO = sys.stderr, poll_s: float = 1.0) -> TrainingRun:
    """Poll the run until it ends, redrawing one progress line (plain lines when ``out`` is not a terminal)."""
    tty = out.isatty()
    width = max(10, min(40, shutil.get_terminal_size().columns - 50))
    last_line = ""
    while True:
        line = _bar(run, width)
        if tty:
            out.write("\r" + line.ljust(len(last_line)))
        elif line.split("]")[1] != last_line.split("]")[-1]:
            out.write(line + "\n")
        out.flush()
        last_line = line
        if run.status not in ("queued", "running"):  # queued: waiting for a cluster's trainer process
            break
        time.sleep(poll_s)
        run = client.training.get(run.id)
    if tty:
        out.write("\n")
    return run


def summary(run: TrainingRun) -> str:
    lines = [f"run {run.id}: {run.status}" + (f" ({run.error})" if run.error else "")]
    rm = run.metrics.get("reward_model") or {}
    if rm.get("heldout_accuracy") is not None:
        lines.append(f"  reward model: held-out accuracy {rm['heldout_accuracy']:.3f} on {rm['heldout_pairs']} pairs")
    gate = run.metrics.get("gate") or {}
    if gate:
        lines.append(f"  gate: {'pass' if gate['promote'] else 'fail'} — {gate['reason']}")
        if gate.get("judge"):
            lines.append(f"  judged by the {gate['judge']} on {gate.get('prompts')} prompts"
                         + (f"; PPO's reward model saw a gain of {gate['reward_model_gain']:+.3f}"
                            if gate.get("reward_model_gain") is not None else ""))
        implicit = gate.get("implicit_reward") or {}
        if implicit.get("raised") is not None:
            lines.append(f"  implicit-reward check: the candidate favours users' chosen replies more than its parent "
                         f"on {implicit['raised']:.0%} of {implicit['n']} held-out judgements")
    if run.candidate is not None:
        lines.append(f"  candidate: version {run.candidate}" + (" (promoted)" if run.promoted else ""))
    return "\n".join(lines)


def main(*, url: str, admin_key: str | None, iterations: int | None, rollout_batch_size: int | None,
         time_limit_s: float | None, promote: bool, wait: bool, objective: str | None = None) -> int:
    with Client(url, api_key=admin_key) as client:
        try:
            run = client.training.start(iterations=iterations, rollout_batch_size=rollout_batch_size,
                                        time_limit_s=time_limit_s, promote=promote, objective=objective)
        except AligndError as e:
            print(f"alignd train: {e}", file=sys.stderr)
            return 2
        print(f"{'queued' if run.status == 'queued' else 'started'} {run.id} from policy version {run.parent}",
              file=sys.stderr)
        if not wait:
            print(run.id)
            return 0
        try:
            run = follow(client, run)
        except KeyboardInterrupt:
            print(f"\nstopped following; the run goes on (cancel: POST /v1/training/runs/{run.id}/cancel)",
                  file=sys.stderr)
            return 1
        except AligndError as e:
            print(f"alignd train: lost the run: {e}", file=sys.stderr)
            return 1
    print(summary(run))
    return 0 if run.status == "succeeded" else 1
