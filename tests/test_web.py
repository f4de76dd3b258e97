"""The web chat (``/``) and the operator dashboard (``/admin``) end to end: Debian's Chromium, headless, driven by
Playwright, against the real server and engine. What the pages send is read back through the API (``GET
/v1/feedback``) and the store; the admin endpoints the dashboard adds (``/v1/feedback/stats``, ``/v1/plugins``) and
the static file serving are tested over plain HTTP here and in ``tests/test_dashboard_api.py``.

Chromium is ``$ALIGND_TEST_CHROMIUM`` or ``chromium`` on the PATH (``tests/run.sh`` installs Debian's package);
Playwright's own browser download is never used. Set ``ALIGND_SCREENSHOT_DIR=docs`` to refresh the screenshots in
``docs/``.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from alignd.trainer.config import DataConfig
from alignd.trainer.data import is_heldout
from tests.serverkit import AppServer

ADMIN_KEY = "admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
# A tiny training budget (two PPO iterations of eight rollouts), as in tests/test_training.py: the dashboard test
# checks that a real run's figures are drawn, not that the policy learns.
TRAINER = {"training_trigger": "manual", "ppo_iterations": 2, "rollout_batch_size": 8, "max_new_tokens": 24,
           "gate_margin": -100.0, "kl_budget": 1000.0, "trainer_threads": 1,
           "reward_model_confidence": 0.0}  # machinery, not learning: a handful of pairs proves no reward model
REPLY_TIMEOUT_MS = 120_000  # a reply on two CPU cores, with other tests' engines busy


# --- fixtures ------------------------------------------------------------------------------------------------------


def chromium_executable() -> str:
    """Debian's chromium (or ``$ALIGND_TEST_CHROMIUM``); these tests fail, never skip, without one."""
    path = os.environ.get("ALIGND_TEST_CHROMIUM") or shutil.which("chromium")
    if not path or not Path(path).exists():
        pytest.fail("Chromium is required for the web tests: install Debian's 'chromium' package (tests/run.sh "
                    "does) or set ALIGND_TEST_CHROMIUM to its executable.", pytrace=False)
    return path


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    b = playwright.chromium.launch(executable_path=chromium_executable())
    yield b
    b.close()


@pytest.fixture(scope="module")
def web(make_server: Callable[..., AppServer]) -> AppServer:
    """The app the pages are tested on: SQLite, no API key, an admin key, a tiny trainer budget."""
    return make_server(admin_keys=[ADMIN_KEY], trainer=TRAINER)


class Tab:
    """A fresh browser context (empty localStorage) with one page, recording what must not happen: a request to
    another host, an uncaught script error, or something the page's Content-Security-Policy blocked."""

    def __init__(self, browser: Browser, server: AppServer, viewport: dict[str, int] = DESKTOP) -> None:
        self.server = server
        self.context = browser.new_context(viewport=viewport, reduced_motion="reduce")
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.outside: list[str] = []
        self.script_errors: list[str] = []
        host = urlsplit(server.url).netloc
        self.page.on("request", lambda r: None if urlsplit(r.url).netloc == host or r.url.startswith("data:")
                     else self.outside.append(r.url))
        self.page.on("pageerror", lambda e: self.script_errors.append(str(e)))
        self.page.on("console", lambda m: self.script_errors.append(m.text)
                     if m.type == "error" and "Content Security Policy" in m.text else None)

    def goto(self, path: str = "/") -> Page:
        response = self.page.goto(self.server.url + path)
        assert response is not None and response.status == 200
        return self.page

    def close(self) -> None:
        self.context.close()
        assert self.outside == [], "the page loaded something from another host"
        assert self.script_errors == []


@pytest.fixture
def tab(browser: Browser, web: AppServer) -> Iterator[Tab]:
    t = Tab(browser, web)
    yield t
    t.close()


def screenshot(page: Page, name: str, tmp_path: Path, *, full_page: bool = False) -> Path:
    """Save a screenshot into ``$ALIGND_SCREENSHOT_DIR`` (docs/ when refreshing them) or the test's tmp dir."""
    folder = Path(os.environ.get("ALIGND_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 10_000  # a real picture, not an empty page
    return path


# --- helpers -------------------------------------------------------------------------------------------------------


def ask(page: Page, text: str) -> tuple[dict[str, Any], str]:
    """Type a message and press Enter; wait for the reply to finish. Returns the chat request's body and the
    completion id the page shows."""
    page.fill("#prompt", text)
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions") and r.method == "POST") as sent:
        page.press("#prompt", "Enter")
    turn = page.locator("article.turn").last
    turn.and_(page.locator("[data-status=done]")).wait_for(timeout=REPLY_TIMEOUT_MS)
    completion_id = turn.get_attribute("data-completion")
    assert completion_id and completion_id.startswith("chatcmpl-")
    return sent.value.post_data_json, completion_id


def stored_texts(srv: AppServer, completion_id: str) -> list[str]:
    """The choices' texts as the server stored them."""
    completion, _ = srv.loop.run(srv.state.store.feedback_context(completion_id))
    assert completion is not None
    return [c.text for c in completion.choices]


def shown_texts(page: Page) -> dict[int, str]:
    """The last turn's replies as shown: choice index → text."""
    turn = page.locator("article.turn").last
    return {int(el.get_attribute("data-choice") or -1): el.locator(".reply-text").inner_text()
            for el in turn.locator("[data-choice]").all()}


def feedback_events(srv: AppServer, completion_id: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{srv.url}/v1/feedback", params={"completion_id": completion_id}, headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def set_mode(page: Page, mode: str, shortcut: str) -> None:
    page.keyboard.press(shortcut)
    assert page.is_checked(f"input[name=mode][value={mode}]")


# --- the chat ------------------------------------------------------------------------------------------------------


def test_chat_streams_a_reply_and_keeps_the_conversation(tab: Tab, web: AppServer, tmp_path: Path) -> None:
    page = tab.goto("/")
    assert page.evaluate("document.activeElement.id") == "prompt"
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as answered:
        body, cid = ask(page, "How do I keep basil alive?")
    assert answered.value.headers["content-type"].startswith("text/event-stream")
    assert body["stream"] is True and body["n"] == 1 and body["model"] == "alignd"
    assert body["messages"] == [{"role": "user", "content": "How do I keep basil alive?"}]
    [text] = stored_texts(web, cid)
    assert text and shown_texts(page) == {0: text}  # every streamed delta arrived, in order
    assert page.locator("article.turn .badge.policy").inner_text() == "policy-0"
    assert page.evaluate("document.activeElement.id") == "prompt"

    # The next request carries the conversation so far.
    body, second = ask(page, "And in winter?")
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == text
    screenshot(page, "screenshot-chat.png", tmp_path)

    # Kept in localStorage: a reload shows it again.
    page.reload()
    page.locator("article.turn").nth(1).wait_for()
    assert page.locator(".user-msg").all_inner_texts() == ["How do I keep basil alive?", "And in winter?"]
    assert page.locator("article.turn").first.locator(".reply-text").inner_text() == text
    assert page.locator("#conversations .open-conv").all_inner_texts() == ["How do I keep basil alive?"]

    # A new conversation starts empty and sends no history; the old one can be opened again.
    page.keyboard.press("Alt+N")
    assert page.locator("article.turn").count() == 0 and page.locator(".empty-state").is_visible()
    body, _ = ask(page, "Tell me about comets.")
    assert body["messages"] == [{"role": "user", "content": "Tell me about comets."}]
    assert page.locator("#conversations .open-conv").count() == 2
    page.click("#conversations .open-conv >> text=How do I keep basil alive?")
    assert page.locator(".user-msg").all_inner_texts() == ["How do I keep basil alive?", "And in winter?"]
    assert page.locator("article.turn").last.get_attribute("data-completion") == second


def test_thumbs_with_reasons_comment_rating_and_an_edit(tab: Tab, web: AppServer) -> None:
    page = tab.goto("/")
    _, cid = ask(page, "How do I bake bread at home?")
    [original] = stored_texts(web, cid)

    page.click("[data-choice='0'] [data-thumb=down]")
    form = page.locator(".fb-panel")
    assert page.evaluate("document.activeElement.textContent") == "Send feedback"  # Enter would send at once
    form.get_by_label("wrong").check()
    form.get_by_label("too long").check()
    form.locator("textarea").fill("It did not answer the question.")
    form.locator("select").select_option("3")
    form.locator("button[type=submit]").click()
    page.locator(".thanks").wait_for()
    assert page.get_attribute("[data-thumb=down]", "aria-pressed") == "true"

    page.click("[data-choice='0'] .edit")
    editor = page.locator(".edit-panel textarea")
    assert editor.input_value() == original
    editor.fill("Mix flour, water, salt and yeast; knead, let it rise, then bake at 230 °C.")
    editor.press("Control+Enter")
    page.locator(".badge >> text=edited").wait_for()

    events = feedback_events(web, cid)
    assert [e["kind"] for e in events] == ["thumbs", "rating", "edit"]
    thumbs, rating, edit = events
    assert thumbs["payload"] == {"value": "down", "choice": 0} and thumbs["choice"] == 0
    assert thumbs["tags"] == ["wrong", "too long"] and thumbs["comment"] == "It did not answer the question."
    assert rating["payload"] == {"score": 3, "choice": 0}
    assert edit["payload"]["text"].startswith("Mix flour") and edit["choice"] == 0
    assert (thumbs["labels"], edit["pairs"]) == (1, 1)

    # The conversation goes on with the corrected reply.
    body, _ = ask(page, "How long should it rise?")
    assert body["messages"][1] == {"role": "assistant", "content": edit["payload"]["text"]}


def test_compare_two_replies_and_pick(tab: Tab, web: AppServer) -> None:
    page = tab.goto("/")
    set_mode(page, "compare", "Alt+2")
    body, cid = ask(page, "Tell me about comets.")
    assert body["n"] == 2 and body["temperature"] >= 0.7
    texts = stored_texts(web, cid)
    assert shown_texts(page) == {0: texts[0], 1: texts[1]}
    left, right = page.locator(".replies.compare .reply").all()
    assert left.bounding_box()["x"] < right.bounding_box()["x"]  # side by side on a desktop
    # The keyboard is on the choice: "2" picks the right reply.
    assert page.evaluate("document.activeElement.closest('.pick-bar') !== null")
    page.keyboard.press("2")
    page.locator(".pick-result").wait_for()
    assert page.get_attribute(".reply.chosen", "data-choice") == "1"
    [event] = feedback_events(web, cid)
    assert (event["kind"], event["payload"]["winner"], event["pairs"]) == ("pairwise", 1, 1)
    body, second = ask(page, "Which one is the brightest?")
    assert body["messages"][1]["content"] == texts[1]  # the preferred reply continues the conversation

    page.click("button[data-winner=both_bad]")
    page.locator("article.turn").last.locator(".pick-result").wait_for()
    [event] = feedback_events(web, second)
    assert (event["payload"]["winner"], event["labels"]) == ("both_bad", 2)


def test_rank_three_by_dragging_and_number_keys(tab: Tab, web: AppServer) -> None:
    page = tab.goto("/")
    set_mode(page, "rank", "Alt+3")
    body, cid = ask(page, "How do I plan a trip to Rome?")
    assert body["n"] == 3
    texts = stored_texts(web, cid)
    assert shown_texts(page) == dict(enumerate(texts))

    def order() -> list[int]:
        return [int(x) for x in page.eval_on_selector_all(".rank-list > li", "els => els.map(e => e.dataset.choice)")]

    assert order() == [0, 1, 2]
    page.drag_and_drop(".rank-list > li[data-choice='2']", ".rank-list > li[data-choice='0']")
    assert order() == [2, 0, 1]
    page.focus(".rank-list > li[data-choice='1']")
    page.keyboard.press("2")  # to place 2
    assert order() == [2, 1, 0]
    page.keyboard.press("Alt+ArrowDown")
    page.keyboard.press("Alt+ArrowUp")
    assert order() == [2, 1, 0] and page.evaluate("document.activeElement.dataset.choice") == "1"
    page.keyboard.press("Control+Enter")
    page.locator(".pick-result").wait_for()
    [event] = feedback_events(web, cid)
    assert (event["kind"], event["payload"]["ranking"], event["pairs"]) == ("ranking", [2, 1, 0], 3)
    body, _ = ask(page, "What should I see first?")
    assert body["messages"][1]["content"] == texts[2]  # the best-ranked reply continues the conversation


def test_errors_are_shown_in_plain_words(tab: Tab) -> None:
    page = tab.goto("/")
    # A real refusal: a longest reply beyond the model's context (512 tokens here).
    page.click("#open-settings")
    page.fill("#set-max-tokens", "5000")
    page.click("#settings-save")
    page.fill("#prompt", "Hello there")
    page.press("#prompt", "Enter")
    box = page.locator(".error-box").last
    box.wait_for()
    text = box.inner_text()
    assert "does not fit in what is left of the model's context" in text
    assert "The server said: max_tokens is 5000" in text
    assert "{" not in text and "invalid_request_error" not in text

    page.click("#open-settings")
    page.fill("#set-max-tokens", "32")
    page.click("#settings-save")
    # An internal error: its generic message is not repeated; the sentence says what to do.
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=500, content_type="application/json", body=(
        json.dumps({"error": {"message": "Internal server error.", "type": "server_error", "param": None,
                              "code": "internal_error"}}))))
    page.locator("article.turn").last.get_by_role("button", name="Try again").click()
    box = page.locator(".error-box").last
    box.wait_for()
    assert box.inner_text().startswith("Something went wrong on the server. Try again")
    assert "The server said" not in box.inner_text()
    # No answer at all.
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.abort())
    page.locator("article.turn").last.get_by_role("button", name="Try again").click()
    page.locator(".error-box >> text=Could not reach the server").wait_for()
    # Back to normal: trying again gets a real reply.
    page.unroute("**/v1/chat/completions")
    page.locator("article.turn").last.get_by_role("button", name="Try again").click()
    page.locator("article.turn[data-status=done]").wait_for(timeout=REPLY_TIMEOUT_MS)
    assert page.locator("article.turn").count() == 1 and page.locator(".error-box").count() == 0


def test_api_key_entry(browser: Browser, make_server: Callable[..., AppServer]) -> None:
    srv = make_server(api_keys=["user-key"], admin_keys=[ADMIN_KEY])
    assert httpx.get(f"{srv.url}/").status_code == 200  # the page itself needs no key
    tab = Tab(browser, srv)
    try:
        page = tab.goto("/")
        authorizations: list[str | None] = []
        page.on("request", lambda r: authorizations.append(r.headers.get("authorization"))
                if "/v1/" in r.url else None)
        page.fill("#prompt", "Hello!")
        page.press("#prompt", "Enter")
        dialog = page.locator("#key-dialog")
        dialog.wait_for()
        assert "needs an API key" in page.inner_text("#key-reason")
        page.fill("#api-key", "wrong-key")
        page.press("#api-key", "Enter")
        page.locator("#key-reason >> text=That key was not accepted").wait_for()
        assert "Invalid API key" in page.inner_text("#key-reason")
        page.fill("#api-key", "user-key")
        page.press("#api-key", "Enter")
        page.locator("article.turn[data-status=done]").wait_for(timeout=REPLY_TIMEOUT_MS)
        assert not dialog.is_visible()
        assert page.evaluate("localStorage.getItem('alignd.apiKey')") == json.dumps("user-key")
        assert authorizations == [None, "Bearer wrong-key", "Bearer user-key"]

        cid = page.locator("article.turn").get_attribute("data-completion")
        assert cid is not None
        page.click("[data-thumb=up]")
        page.click(".fb-panel button[type=submit]")
        page.locator(".thanks").wait_for()
        [event] = feedback_events(srv, cid)
        assert event["payload"] == {"value": "up", "choice": 0}
        assert authorizations[-1] == "Bearer user-key"
    finally:
        tab.close()


def test_phone_layout_and_keyboard_help(browser: Browser, web: AppServer, tmp_path: Path) -> None:
    tab = Tab(browser, web, viewport=PHONE)
    try:
        page = tab.goto("/")
        set_mode(page, "compare", "Alt+2")
        ask(page, "What should I cook tonight?")
        # Nothing wider than the screen; the two replies are stacked; the conversation list is off screen.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        left, right = (r.bounding_box() for r in page.locator(".replies.compare .reply").all())
        assert left["x"] == right["x"] and left["y"] < right["y"]
        assert page.locator("#history").bounding_box()["x"] + page.locator("#history").bounding_box()["width"] <= 0
        screenshot(page, "screenshot-chat-phone.png", tmp_path)
        page.click("#toggle-history")
        assert page.locator("#history").bounding_box()["x"] >= 0
        assert page.get_attribute("#toggle-history", "aria-expanded") == "true"
        page.click("#close-history")
        assert page.get_attribute("#toggle-history", "aria-expanded") == "false"

        # Keyboard: Tab goes from the message box to Send; "?" (outside a text field) opens the help.
        page.focus("#prompt")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "send"
        page.keyboard.press("?")
        help_text = page.locator("#help").inner_text()
        for shortcut in ("Enter", "Alt", "Compare", "Rank", "Esc"):
            assert shortcut in help_text
        page.keyboard.press("Escape")
        assert not page.locator("#help").is_visible()
        page.keyboard.press("/")
        assert page.evaluate("document.activeElement.id") == "prompt"
    finally:
        tab.close()


# --- the dashboard -------------------------------------------------------------------------------------------------


def give_pairwise_feedback(srv: AppServer, at_least: int, heldout: int) -> None:
    """Pairwise feedback until there are ``at_least`` events, ``heldout`` of them in the trainer's held-out split
    (chosen by a hash of the random completion id), so that the run reports a held-out accuracy."""
    fraction, given, held = DataConfig().heldout_fraction, 0, 0
    while given < at_least or held < heldout:
        assert given < 200, "no feedback id fell into the held-out split"
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={
            "model": "alignd", "messages": [{"role": "user", "content": f"Tell me about topic {given}."}], "n": 2,
            "temperature": 1.0, "max_tokens": 16}, timeout=120)
        assert r.status_code == 200, r.text
        fb = httpx.post(f"{srv.url}/v1/feedback", json={"completion_id": r.json()["id"], "kind": "pairwise",
                                                        "winner": given % 2}, timeout=30)
        assert fb.status_code == 201, fb.text
        given += 1
        held += is_heldout(r.json()["id"], fraction)


def test_dashboard(tab: Tab, web: AppServer, tmp_path: Path) -> None:
    give_pairwise_feedback(web, at_least=12, heldout=2)
    page = tab.goto("/admin")
    page.fill("#admin-key", "not-the-key")
    page.press("#admin-key", "Enter")
    page.locator("#login-error >> text=That key was not accepted").wait_for()
    page.fill("#admin-key", ADMIN_KEY)
    page.press("#admin-key", "Enter")
    page.locator("body[data-loaded=true]").wait_for()

    # Policies: the base model is served.
    policies = httpx.get(f"{web.url}/v1/policies", headers=ADMIN).json()
    assert page.locator("#policies tbody tr").count() == len(policies["data"])
    assert page.locator("#policies tr[data-version='0'] .status").inner_text() == "promoted"
    # Plugins, as the API lists them.
    plugins = httpx.get(f"{web.url}/v1/plugins", headers=ADMIN).json()["data"]
    assert page.locator("#plugins tbody tr").count() == len(plugins)
    assert page.locator("#plugins tr[data-plugin=pairwise] td").nth(3).inner_text() == "pairwise"
    # Feedback volume: the bars add up to the counts of /v1/feedback/stats.
    stats = httpx.get(f"{web.url}/v1/feedback/stats", params={"bucket": "hour"}, headers=ADMIN).json()
    drawn = page.eval_on_selector_all("#volume-chart rect.bar", "rs => rs.map(r => [r.dataset.kind, +r.dataset.count])")
    by_kind: dict[str, int] = {}
    for kind, count in drawn:
        by_kind[kind] = by_kind.get(kind, 0) + count
    assert by_kind == stats["totals"] and by_kind["pairwise"] >= 12

    # A training run started from the dashboard; a second start while it runs is refused in plain words.
    page.click("#start-run-button")
    page.locator("#training-note >> text=Started run").wait_for()
    run_id = page.inner_text("#training-note").removeprefix("Started run ").removesuffix(".")
    page.click("#start-run-button")
    page.locator("#training-note >> text=already in progress").wait_for()
    page.locator(f"#runs tr[data-run='{run_id}'] .status.succeeded").wait_for(timeout=600_000)
    assert page.inner_text(f"#runs tr[data-run='{run_id}'] td.objective") == "ppo"  # the server's default
    run = httpx.get(f"{web.url}/v1/training/runs/{run_id}", headers=ADMIN).json()
    # It passed the gate: it is the canary, tested live on a share of users, and the live-test panel shows it.
    assert run["status"] == "succeeded" and not run["promoted"] and run["candidate"], run
    page.locator(f"#policies tr[data-version='{run['candidate']}'] .status >> text=canary").wait_for()
    page.locator(f"#canary tr[data-canary='{run['candidate']}']").wait_for()
    assert page.locator(f"#canary tr[data-canary='{run['candidate']}'] td").nth(1).inner_text() == "10.0%"
    assert "answers 10.0% of users" in page.inner_text("#canary-note")
    # One point per PPO iteration on the reward and KL plots, one per run on the accuracy plot.
    iterations = len(run["metrics"]["ppo"])
    assert iterations == TRAINER["ppo_iterations"]
    assert page.locator("#plot-reward circle.point").count() == iterations
    assert page.locator("#plot-kl circle.point").count() == iterations
    assert page.locator("#plot-reward polyline").count() == 1
    assert page.locator("#plot-rm circle.point").count() == 3  # the accuracy and its interval's two ends
    screenshot(page, "screenshot-admin.png", tmp_path, full_page=True)
    # The operator ends the live test by promoting it from the panel.
    page.click("#canary-actions button.canary-promote")
    page.locator(f"#canary-note >> text=Canary {run['candidate']}: promoted").wait_for()
    page.locator(f"#policies tr[data-version='{run['candidate']}'] .status >> text=promoted").wait_for()
    assert httpx.get(f"{web.url}/v1/policies", headers=ADMIN).json()["promoted"] == run["candidate"]
    decision = page.locator(f"#canary tr[data-canary='{run['candidate']}'] td").nth(6).inner_text()
    assert decision.startswith("promoted") and "promoted from canary by an operator" in decision, decision

    # Roll back to the base model, then promote the candidate again with its button.
    page.click("#rollback")
    page.locator("#policies-note >> text=version 0 is served again").wait_for()
    assert httpx.get(f"{web.url}/v1/policies", headers=ADMIN).json()["promoted"] == 0
    page.click(f"#policies tr[data-version='{run['candidate']}'] button.promote")
    page.locator(f"#policies-note >> text=Version {run['candidate']} is now served").wait_for()
    assert httpx.get(f"{web.url}/v1/policies", headers=ADMIN).json()["promoted"] == run["candidate"]

    # The chat shows the version that wrote each reply.
    chat = Tab(tab.context.browser, web)
    try:
        page = chat.goto("/")
        ask(page, "Hello again!")
        assert page.locator("article.turn .badge.policy").inner_text() == f"policy-{run['candidate']}"
    finally:
        chat.close()


def test_dashboard_on_a_phone_and_without_the_training_api(browser: Browser, web: AppServer, tmp_path: Path) -> None:
    """An older server without the policy and training endpoints: those sections say so, the others still work."""
    tab = Tab(browser, web, viewport=PHONE)
    try:
        page = tab.page
        missing = json.dumps({"error": {"message": "Not Found", "type": "invalid_request_error", "param": None,
                                        "code": "not_found"}})
        for pattern in ("**/v1/policies*", "**/v1/training/runs*"):
            page.route(pattern, lambda route: route.fulfill(status=404, content_type="application/json", body=missing))
        tab.goto("/admin")
        page.fill("#admin-key", ADMIN_KEY)
        page.press("#admin-key", "Enter")
        page.locator("body[data-loaded=true]").wait_for()
        assert page.inner_text("#policies-note").startswith("This server does not offer policy versions")
        assert page.inner_text("#training-note").startswith("This server does not offer training runs")
        assert page.is_disabled("#rollback")
        assert page.locator("#volume-chart rect.bar").count() > 0
        assert page.locator("#plugins tbody tr").count() > 0
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.unroute("**/v1/policies*")
        page.unroute("**/v1/training/runs*")
        page.click("#refresh")
        page.locator("#policies tbody tr").first.wait_for()
        screenshot(page, "screenshot-admin-phone.png", tmp_path)
    finally:
        tab.close()


# --- the static files ----------------------------------------------------------------------------------------------


def raw_get(srv: AppServer, path: str) -> tuple[int, str]:
    """GET with the path sent exactly as written (httpx would resolve ``..`` itself)."""
    host, port = urlsplit(srv.url).hostname, urlsplit(srv.url).port
    conn = http.client.HTTPConnection(host or "127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def test_static_files(web: AppServer) -> None:
    for path, content_type in (("/", "text/html"), ("/admin", "text/html"), ("/static/style.css", "text/css"),
                               ("/static/chat.js", "text/javascript"), ("/static/admin.js", "text/javascript")):
        r = httpx.get(web.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(content_type), (path, r.headers)
        assert r.headers["cache-control"] == "no-cache"
    page = httpx.get(web.url + "/")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="static/chat.js">' in page.text
    # Nothing outside clients/web/ is reachable, however the path is written.
    for path in ("/static/../server/app.py", "/static/%2e%2e/server/app.py", "/static/..%2f..%2fserver/app.py",
                 "/static/%2e%2e/%2e%2e/pyproject.toml", "/static/nope.js"):
        status, body = raw_get(web, path)
        assert status == 404 and "def create_app" not in body and "[project]" not in body, path
