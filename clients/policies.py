"""``alignd policies``: list the policy versions of a running server, promote or roll back, read a version's
evaluation (the offline gate and the live test), and run its canary (admin key).

Exit status: 0 on success, 1 when the server refused or could not be reached.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from alignd.clients.sdk import AligndError, Client
from alignd.protocol import Policy, PolicyEvaluation, PolicyList


def _run(url: str, admin_key: str | None, call: Callable[[Client], Any]) -> Any:
    with Client(url, api_key=admin_key) as client:
        try:
            return call(client)
        except AligndError as e:
            print(f"alignd policies: {e}", file=sys.stderr)
            return None


def _print(value: Any, as_json: bool, text: Callable[[Any], str]) -> int:
    if value is None:
        return 1
    print(json.dumps(msgspec.to_builtins(value), indent=2) if as_json else text(value))
    return 0


def _policy_line(p: Policy) -> str:
    return f"{p.version:>7}  {p.status:<9}  {'loaded' if p.loaded else '':<6}  {p.reason or ''}"


def _listing_text(pl: PolicyList) -> str:
    """The versions, then the promotion under way (if any) and the live replicas."""
    lines = [f"{'VERSION':>7}  {'STATUS':<9}  {'':<6}  REASON", *(_policy_line(p) for p in pl.data)]
    promotion = pl.promotion
    if promotion is not None and promotion.pending:
        lines.append(f"\npromotion pending: version {promotion.desired} (served: {promotion.served}), loaded on "
                     f"{len(promotion.loaded_on)}, waiting for {', '.join(promotion.waiting_for) or 'nobody'}; "
                     f"flips without them at {promotion.deadline}")
    elif promotion is not None and promotion.laggards:
        lines.append(f"\nversion {promotion.served} was served without: " + "; ".join(
            f"{who} ({why})" for who, why in promotion.laggards.items()))
    if pl.replicas:
        lines.append(f"\n{'REPLICA':<32}  {'READY':<5}  {'SERVES':>6}  {'LOADED':<16}  LAST SEEN")
        lines.extend(f"{r.instance_id + (' *' if r.this else ''):<32}  {'yes' if r.ready else 'no':<5}  "
                     f"{'' if r.serving is None else r.serving:>6}  {','.join(map(str, r.loaded)):<16}  {r.last_seen}"
                     + (f"  error: {r.error}" if r.error else "") for r in pl.replicas)
    return "\n".join(lines)


def list_policies(*, url: str, admin_key: str | None, as_json: bool) -> int:
    """Every version, newest first, the promotion under way and each live replica (``*``: the one that answered)."""
    return _print(_run(url, admin_key, lambda c: c.policies.list()), as_json, _listing_text)


def act(*, url: str, admin_key: str | None, action: str, version: int | None, as_json: bool,
        share: float | None = None, side_by_side: bool | None = None) -> int:
    """``promote``, ``rollback``, ``canary`` (start or re-share) and ``canary-promote|reject|stop``."""
    calls: dict[str, Callable[[Client], Policy]] = {
        "promote": lambda c: c.policies.promote(version),  # type: ignore[arg-type]
        "rollback": lambda c: c.policies.rollback(version),
        "canary": lambda c: c.policies.start_canary(version, share, side_by_side),  # type: ignore[arg-type]
        "canary-promote": lambda c: c.policies.promote_canary(version),  # type: ignore[arg-type]
        "canary-reject": lambda c: c.policies.reject_canary(version),  # type: ignore[arg-type]
        "canary-stop": lambda c: c.policies.stop_canary(version),  # type: ignore[arg-type]
    }
    return _print(_run(url, admin_key, calls[action]), as_json, _policy_line)


def evaluation(*, url: str, admin_key: str | None, version: int, as_json: bool) -> int:
    found = _run(url, admin_key, lambda c: c.policies.evaluation(version))
    return _print(found, as_json, _evaluation_text)


def _bounds(low: Any, high: Any) -> str:
    return "" if low is None or high is None else f" [{low:+.3f}, {high:+.3f}]"


def _rate(figures: dict[str, Any], name: str) -> str:
    value, interval = figures.get(f"{name}_rate"), figures.get(f"{name}_interval")
    if value is None:
        return "n/a"
    return f"{value:.1%}" + (f" [{interval[0]:.1%}, {interval[1]:.1%}]" if interval else "")


def _evaluation_text(e: PolicyEvaluation) -> str:
    lines = [f"policy {e.version}: {e.status}"]
    gate = e.offline or {}
    if "gain" in gate:
        level = f"{gate.get('confidence', 0.95):.0%}"
        lines.append(f"  offline gate: {'pass' if gate.get('promote') else 'fail'}; paired gain {gate['gain']:+.3f} "
                     f"(one-sided {level} bounds{_bounds(gate.get('gain_lower'), gate.get('gain_upper'))}) on "
                     f"{gate.get('prompts')} prompts x {gate.get('samples_per_prompt')}, judged by the "
                     f"{gate.get('judge')}")
        if gate.get("reward_model_gain") is not None:
            lines.append(f"  PPO's reward model saw {gate['reward_model_gain']:+.3f}")
        implicit = gate.get("implicit_reward") or {}
        if implicit.get("raised") is not None:
            lines.append(f"  implicit-reward check: {implicit['raised']:.0%} of {implicit['n']} held-out judgements")
        lines.append(f"  reason: {gate.get('reason')}")
    live = e.live or {}
    if live:
        canary, promoted = live.get("canary") or {}, live.get("promoted") or {}
        lines.append(f"  live test: share {live.get('share')}, {live.get('elapsed_s')} s, "
                     f"{canary.get('requests', 0)} requests on the canary")
        lines.append(f"    good rate: canary {_rate(canary, 'good')} vs promoted {_rate(promoted, 'good')}")
        if canary.get("wins", 0) + canary.get("losses", 0):
            lines.append(f"    side-by-side win rate: {_rate(canary, 'win')} "
                         f"({canary['wins']} wins, {canary['losses']} losses)")
        decision = live.get("decision") or live.get("verdict") or {}
        lines.append(f"    {'decision' if live.get('decision') else 'so far'}: "
                     f"{decision.get('outcome') or decision.get('decision') or 'running'} - {decision.get('reason')}")
    return "\n".join(lines)
