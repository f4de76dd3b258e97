"""The plugin system without a server: the manager (built-ins, entry points, allow/block lists, conflicts), the
built-in kinds' converters on plain Structs, the sink dispatcher, the hook docs, and ``alignd plugins``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from alignd import Feedback, Signal
from alignd.config import Settings, load_settings
from alignd.errors import InvalidFeedback
from alignd.feedback import hookspecs
from alignd.feedback.manager import (
    BUILTIN_PLUGINS,
    PluginError,
    collect_feedback_kinds,
    collect_routes,
    describe_plugins,
    hook_impls,
    make_plugin_manager,
)
from alignd.feedback.sinks import SinkDispatcher
from alignd.metrics import Metrics
from alignd.protocol import (
    EditFeedback,
    PairwiseFeedback,
    RankingFeedback,
    RatingFeedback,
    ThumbsFeedback,
)
from alignd.store import ChoiceRecord, CompletionRecord
from tests import feedback_plugins

REPO = Path(__file__).resolve().parent.parent
BUILTIN_NAMES = [target.rpartition(".")[2] for target in BUILTIN_PLUGINS]


def settings(**plugins: Any) -> Settings:
    return load_settings({"plugins": plugins}, environ={})


def completion(n: int = 3, messages: list[dict[str, Any]] | None = None) -> CompletionRecord:
    return CompletionRecord(
        id="chatcmpl-test", created=datetime.now(UTC), model="alignd", policy_version=2,
        messages=messages or [{"role": "user", "content": "Which bread?"}], params={}, user="ann", metadata=None,
        prompt_tokens=3, completion_tokens=3, latency_ms=1.0, stream=False,
        choices=[ChoiceRecord(index=i, text=f"reply {i}", token_ids=[], finish_reason="stop") for i in range(n)])


def feedback(kind: str, payload: msgspec.Struct, history: list[Feedback] | None = None) -> Feedback:
    return Feedback(id="fb-1", completion_id="chatcmpl-test", kind=kind, payload=payload, user="ann", comment=None,
                    tags=[], idempotency_key=None, created=datetime.now(UTC), history=history or [])


@pytest.fixture(scope="module")
def kinds() -> dict[str, Any]:
    return collect_feedback_kinds(make_plugin_manager(settings()))


def convert(kinds: dict[str, Any], kind: str, payload: msgspec.Struct, comp: CompletionRecord | None = None,
            history: list[Feedback] | None = None) -> Signal:
    return kinds[kind].convert(feedback(kind, payload, history), comp or completion())


# --- the manager -------------------------------------------------------------------------------------------------


def test_builtins_and_the_installed_example_are_loaded() -> None:
    pm = make_plugin_manager(settings())
    for name in BUILTIN_NAMES:
        assert pm.get_plugin(name) is not None and pm.origins[name] == "built-in"
    assert "entry point" in pm.origins["unsafe"] and "alignd-unsafe" in pm.origins["unsafe"], (
        "the example plugin is installed by deploy/install.sh --dev: pip install -e tests/plugin_example")
    assert set(collect_feedback_kinds(pm)) >= {"thumbs", "ranking", "pairwise", "rating", "edit", "unsafe"}


def test_entry_points_can_be_turned_off() -> None:
    pm = make_plugin_manager(settings(load_entry_points=False))
    assert pm.get_plugin("unsafe") is None and "unsafe" not in collect_feedback_kinds(pm)


def test_blocked_plugin_is_not_loaded() -> None:
    pm = make_plugin_manager(settings(block_plugins=["rating", "unsafe", "not-installed"]))
    assert pm.get_plugin("rating") is None and pm.is_blocked("rating")
    assert pm.get_plugin("unsafe") is None
    assert not {"rating", "unsafe"} & set(collect_feedback_kinds(pm))
    assert pm.skipped["rating"] == ("built-in", "blocked")


def test_allow_list_loads_only_what_it_names() -> None:
    pm = make_plugin_manager(settings(allow_plugins=["thumbs", "unsafe"]))
    assert sorted(name for name, plugin in pm.list_name_plugin() if plugin) == ["thumbs", "unsafe"]
    with pytest.raises(PluginError, match=r"unknown plugin.*nope"):
        make_plugin_manager(settings(allow_plugins=["nope"]))


def test_duplicate_kind_is_a_startup_error_naming_both() -> None:
    pm = make_plugin_manager(settings(plugin_modules=["tests.feedback_plugins:duplicate_thumbs"]))
    with pytest.raises(PluginError) as info:
        collect_feedback_kinds(pm)
    assert "'thumbs'" in str(info.value) and "'duplicate_thumbs'" in str(info.value)


def test_misspelt_hook_is_caught_by_check_pending() -> None:
    with pytest.raises(PluginError, match=r"misspelt.*on_feedbak"):
        make_plugin_manager(settings(plugin_modules=["tests.feedback_plugins:misspelt"]))


def test_module_that_cannot_be_imported_or_shares_a_name() -> None:
    with pytest.raises(PluginError, match=r"nowhere_to_be_found.*failed to load"):
        make_plugin_manager(settings(plugin_modules=["nowhere_to_be_found"]))
    with pytest.raises(PluginError, match="two plugins are named 'thumbs'"):
        make_plugin_manager(settings(plugin_modules=["alignd.plugins.thumbs"]))


def test_invalid_kind_registrations_are_refused() -> None:
    pm = make_plugin_manager(settings(allow_plugins=["thumbs"]))

    class Clash(msgspec.Struct):
        kind: str

    class Bad:
        @hookspecs.hookimpl
        def register_feedback_kinds(self, register: Any) -> None:
            register(self.name, self.payload, lambda f, c: Signal())

    for name, payload, match in (("Bad Name", ThumbsFeedback, "kind name"), ("clash", Clash, "common feedback"),
                                 ("notstruct", dict, "msgspec.Struct")):
        plugin = Bad()
        plugin.name, plugin.payload = name, payload
        pm.register(plugin, name="bad")
        try:
            with pytest.raises(PluginError, match=match):
                collect_feedback_kinds(pm)
        finally:
            pm.unregister(name="bad")


def test_plugin_routes_are_mounted_under_the_plugin_name() -> None:
    pm = make_plugin_manager(settings(plugin_modules=["tests.feedback_plugins:reactions"]))
    [router] = collect_routes(pm)
    assert router.path == "/v1/plugins/reactions" and router.guards == []


def test_describe_lists_loaded_and_skipped_plugins() -> None:
    infos = {i.name: i for i in describe_plugins(make_plugin_manager(settings(block_plugins=["webhook"])))}
    assert infos["thumbs"].kinds == ("thumbs",) and infos["thumbs"].hooks == ("register_feedback_kinds",)
    assert infos["webhook"].status == "blocked"
    assert set(infos["jsonl_sink"].hooks) == {"startup", "on_feedback", "shutdown"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    return subprocess.run([sys.executable, "-m", "alignd.cli", "plugins", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_cli_lists_plugins_honouring_the_block_list() -> None:
    done = _cli("--json", "--block-plugin", "webhook")
    assert done.returncode == 0, done.stderr
    listed = {p["name"]: p for p in json.loads(done.stdout)}
    assert listed["thumbs"]["status"] == "loaded" and listed["thumbs"]["kinds"] == ["thumbs"]
    assert listed["webhook"]["status"] == "blocked"
    assert listed["unsafe"]["kinds"] == ["unsafe"] and "entry point" in listed["unsafe"]["origin"]
    table = _cli()
    assert table.returncode == 0 and re.search(r"^ranking\s+loaded\s+built-in", table.stdout, re.M)


def test_cli_reports_a_duplicate_kind() -> None:
    done = _cli("--plugin-module", "tests.feedback_plugins:duplicate_thumbs")
    assert done.returncode == 2
    assert "'thumbs'" in done.stderr and "'duplicate_thumbs'" in done.stderr


# --- hook documentation ------------------------------------------------------------------------------------------


def hook_names() -> list[str]:
    return [name for name, value in vars(hookspecs).items() if hasattr(value, "alignd_spec")]


def test_every_hook_is_documented() -> None:
    """Each hook has a docstring saying whether it is firstresult, and a heading in docs/plugins.md."""
    names = hook_names()
    assert {"register_feedback_kinds", "filter_feedback", "on_feedback", "register_routes"} <= set(names)
    docs = (REPO / "docs" / "plugins.md").read_text()
    headings = [line for line in docs.splitlines() if re.match(r"#{2,4} ", line)]
    for name in names:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "firstresult" in doc, f"{name}'s docstring must say whether it is firstresult"
        assert any(re.search(rf"\b{name}\b", h) for h in headings), f"docs/plugins.md has no heading for {name}"


# --- converters --------------------------------------------------------------------------------------------------


def test_thumbs_label_and_pair_with_the_opposite_verdict(kinds: dict[str, Any]) -> None:
    up = convert(kinds, "thumbs", ThumbsFeedback(value="up", choice=0))
    assert up.pairs == [] and [(lb.reply, lb.good, lb.choice) for lb in up.labels] == [("reply 0", True, 0)]
    assert up.labels[0].prompt == [{"role": "user", "content": "Which bread?"}]
    history = [feedback("thumbs", ThumbsFeedback(value="up", choice=0)),
               feedback("thumbs", ThumbsFeedback(value="down", choice=2)),
               feedback("thumbs", ThumbsFeedback(value="up", choice=2))]  # changed their mind: 2 is up now
    down = convert(kinds, "thumbs", ThumbsFeedback(value="down", choice=1), history=history)
    assert [(p.chosen_choice, p.rejected_choice, p.chosen, p.rejected) for p in down.pairs] == [
        (0, 1, "reply 0", "reply 1"), (2, 1, "reply 2", "reply 1")]
    assert down.labels[0].good is False
    with pytest.raises(InvalidFeedback) as info:
        convert(kinds, "thumbs", ThumbsFeedback(value="up", choice=3))
    assert info.value.param == "choice"


def test_ranking_pairs_weighted_one_over_k_choose_2(kinds: dict[str, Any]) -> None:
    full = convert(kinds, "ranking", RankingFeedback(ranking=[2, 0, 1]))
    assert [(p.chosen_choice, p.rejected_choice) for p in full.pairs] == [(2, 0), (2, 1), (0, 1)]
    assert all(p.weight == pytest.approx(1 / 3) for p in full.pairs)
    partial = convert(kinds, "ranking", RankingFeedback(ranking=[3]), comp=completion(4))
    assert [(p.chosen_choice, p.rejected_choice) for p in partial.pairs] == [(3, 0), (3, 1), (3, 2)]
    assert all(p.weight == pytest.approx(1 / 6) for p in partial.pairs)
    for bad in ([0, 0], [0, 3]):
        with pytest.raises(InvalidFeedback) as info:
            convert(kinds, "ranking", RankingFeedback(ranking=bad))
        assert info.value.param == "ranking"
    with pytest.raises(InvalidFeedback, match="at least two"):
        convert(kinds, "ranking", RankingFeedback(ranking=[0]), comp=completion(1))


def test_pairwise_winner_tie_and_both_bad(kinds: dict[str, Any]) -> None:
    won = convert(kinds, "pairwise", PairwiseFeedback(winner=2, choices=[0, 2]))
    assert [(p.chosen_choice, p.rejected_choice) for p in won.pairs] == [(2, 0)] and won.labels == []
    assert convert(kinds, "pairwise", PairwiseFeedback(winner="tie")) == Signal()
    both_bad = convert(kinds, "pairwise", PairwiseFeedback(winner="both_bad"))
    assert both_bad.pairs == [] and [(lb.choice, lb.good) for lb in both_bad.labels] == [(0, False), (1, False)]
    for payload, param in ((PairwiseFeedback(winner=2), "winner"), (PairwiseFeedback(winner=0, choices=[1, 1]),
                           "choices"), (PairwiseFeedback(winner=0, choices=[0, 5]), "choices")):
        with pytest.raises(InvalidFeedback) as info:
            convert(kinds, "pairwise", payload)
        assert info.value.param == param
    with pytest.raises(InvalidFeedback) as info:
        convert(kinds, "pairwise", PairwiseFeedback(winner=0), comp=completion(1))
    assert info.value.param == "choices"


def test_rating_pairs_with_margins_and_labels_for_clear_scores(kinds: dict[str, Any]) -> None:
    first = convert(kinds, "rating", RatingFeedback(score=9, choice=0))
    assert first.pairs == [] and [(lb.good, lb.choice) for lb in first.labels] == [(True, 0)]
    history = [feedback("rating", RatingFeedback(score=9, choice=0)),
               feedback("rating", RatingFeedback(score=5, choice=2))]
    second = convert(kinds, "rating", RatingFeedback(score=5, choice=1), history=history)
    assert second.labels == []  # 5 is not a clear score
    assert [(p.chosen_choice, p.rejected_choice, round(p.margin, 4)) for p in second.pairs] == [(0, 1, 0.4444)]
    low = convert(kinds, "rating", RatingFeedback(score=2, choice=1), history=history)
    assert [(p.chosen_choice, p.rejected_choice) for p in low.pairs] == [(0, 1), (2, 1)]
    assert [lb.good for lb in low.labels] == [False]


def test_edit_prefers_the_correction(kinds: dict[str, Any]) -> None:
    signal = convert(kinds, "edit", EditFeedback(text="A sourdough loaf.", choice=1))
    [pair] = signal.pairs
    assert (pair.chosen, pair.rejected, pair.chosen_choice, pair.rejected_choice) == (
        "A sourdough loaf.", "reply 1", None, 1)
    for text in ("   ", " reply 1 "):
        with pytest.raises(InvalidFeedback) as info:
            convert(kinds, "edit", EditFeedback(text=text, choice=1))
        assert info.value.param == "text"


def test_prompt_is_plain_role_content_messages(kinds: dict[str, Any]) -> None:
    comp = completion(2, messages=[{"role": "developer", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                {"type": "text", "text": "there"}], "name": "x"}])
    [label] = convert(kinds, "thumbs", ThumbsFeedback(value="up"), comp=comp).labels
    assert label.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_unsafe_example_plugin_yields_a_weighted_bad_label(kinds: dict[str, Any]) -> None:
    payload = msgspec.convert({"choice": 1, "category": "harmful"}, kinds["unsafe"].payload)
    [label] = convert(kinds, "unsafe", payload).labels
    assert (label.good, label.reply, label.weight) == (False, "reply 1", 2.0)


# --- pii_redact and quota ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("write to jane.doe+bread@example.co.uk please", "write to [email] please"),
    ("call +1 (555) 123-4567 or 020 7946 0958", "call [phone] or [phone]"),
    ("order 12345 on 2024-01-02 10:30, v1.2.3", "order 12345 on 2024-01-02 10:30, v1.2.3"),
])
def test_pii_redaction(text: str, expected: str) -> None:
    from alignd.plugins.pii_redact import redact

    assert redact(text) == expected


def test_quota_token_bucket() -> None:
    from alignd.plugins.quota import TokenBuckets

    buckets = TokenBuckets(per_minute=2)
    assert buckets.take("bob", now=0.0) == 0 and buckets.take("bob", now=0.0) == 0
    assert buckets.take("bob", now=0.0) == pytest.approx(30.0)
    assert buckets.take("carol", now=0.0) == 0
    assert buckets.take("bob", now=30.0) == 0  # one token back after 30 s


# --- sinks -------------------------------------------------------------------------------------------------------


async def test_failing_and_hanging_sinks_are_time_boxed_and_counted() -> None:
    pm = make_plugin_manager(settings(allow_plugins=["thumbs"]))
    recorder, blocking = feedback_plugins.Recorder(), feedback_plugins.BlockingSink()
    for name, plugin in (("failing", feedback_plugins.FailingSink()), ("hanging", feedback_plugins.HangingSink()),
                         ("blocking", blocking), ("recorder", recorder)):
        pm.register(plugin, name=name)
    metrics = Metrics()
    sinks = SinkDispatcher(pm.hook.on_feedback, metrics, timeout_s=0.3, queue_max=2)
    signal = Signal()
    for _ in range(4):
        sinks.dispatch(feedback=feedback("thumbs", ThumbsFeedback(value="up")), completion=completion(),
                       signal=signal, context=None)
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)
    assert len(recorder.seen) == 4, "a healthy sink is not held up by broken ones"
    for _ in range(200):  # the blocked thread is abandoned after the time box
        if metrics.sink_timeouts.labels("blocking")._value.get() >= 1:
            break
        await asyncio.sleep(0.05)
    failed, dropped = (metrics.sink_failures.labels("failing")._value.get(),
                       metrics.sink_dropped.labels("failing")._value.get())
    assert failed >= 1 and failed + dropped == 4, "every event failed or was skipped, and each was counted"
    assert metrics.sink_timeouts.labels("hanging")._value.get() >= 1
    assert metrics.sink_timeouts.labels("blocking")._value.get() >= 1
    assert metrics.sink_dropped.labels("hanging")._value.get() >= 1, "a full queue drops events (counted)"
    blocking.release.set()
    await sinks.close(grace_s=0.2)
    assert [impl.plugin_name for impl in hook_impls(pm.hook.on_feedback)]
