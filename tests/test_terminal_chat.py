"""``alignd chat`` against the real server and engine: over a pipe (a subprocess fed prompts and commands on stdin),
and in a pseudo-terminal with pexpect for /compare, /rank and /edit. Feedback is read back from the server to check
what each command sent, and that the conversation carried the replies (and corrections) forward."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from alignd.clients import Client
from alignd.clients.terminal import parse_ranking, side_by_side
from tests.serverkit import AppServer

ADMIN, USER = "chat-admin-key", "chat-user-key"
REPO = Path(__file__).resolve().parent.parent
FEEDBACK_ID = re.compile(r"sent \((fb-[0-9a-f]+)\)")


@pytest.fixture(scope="module")
def srv(make_server: Callable[..., AppServer]) -> AppServer:
    return make_server(api_keys=[USER], admin_keys=[ADMIN], trainer={"training_trigger": "manual"})


@pytest.fixture(scope="module")
def admin(srv: AppServer) -> Iterator[Client]:
    with Client(srv.url, api_key=ADMIN) as c:
        yield c


def events_by_id(admin: Client, ids: list[str]) -> list[dict[str, Any]]:
    events = {e["id"]: e for e in admin.export("events")}
    return [events[i] for i in ids]


def run_chat(srv: AppServer, stdin: str, *args: str, api_key: str | None = USER) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ALIGND_API_KEY", "EDITOR")}
    if api_key is not None:
        env["ALIGND_API_KEY"] = api_key  # the key from the environment, as a user would set it
    return subprocess.run([sys.executable, "-m", "alignd.cli", "chat", "--url", srv.url, "--max-tokens", "24", *args],
                          input=stdin, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# --- over a pipe ---------------------------------------------------------------------------------------------------


def test_pipe_prints_replies_keeps_the_conversation_and_sends_feedback(srv: AppServer, admin: Client) -> None:
    first, second = "How do I bake bread at home?", "Any tips on growing tomatoes?"
    done = run_chat(srv, f"{first}\n/up\n{second}\n/comment too chatty\n/down\n/rate 4\n/quit\nnever sent\n",
                    "--system", "You are a helpful assistant.")
    assert done.returncode == 0, done.stderr
    replies = done.stdout.splitlines()
    assert len(replies) == 2 and all(replies), done.stdout
    assert "\x1b[" not in done.stdout + done.stderr and "you>" not in done.stdout, "no prompts or colours"
    assert done.stderr.count("(policy-0)") == 2

    up, down, rating = events_by_id(admin, FEEDBACK_ID.findall(done.stderr))
    system = {"role": "system", "content": "You are a helpful assistant."}
    assert (up["kind"], up["payload"], up["comment"]) == ("thumbs", {"value": "up", "choice": 0}, None)
    assert up["prompt"] == [system, user(first)] and up["choices"] == [replies[0]]
    assert down["payload"]["value"] == "down" and down["comment"] == "too chatty"
    assert down["prompt"] == [system, user(first), assistant(replies[0]), user(second)], "the conversation is kept"
    assert down["choices"] == [replies[1]]
    assert rating["completion_id"] == down["completion_id"] and rating["payload"] == {"score": 4, "choice": 0}
    assert rating["comment"] is None, "a comment rides on one feedback only"


def test_pipe_answers_command_questions_from_the_next_lines(srv: AppServer, admin: Client) -> None:
    done = run_chat(srv, "Tell me about comets.\n/compare\ntie\n/rank 4\n4 2\n/new\n/up\n")
    # /up after /new has no reply to act on: an error, so the exit status says something failed.
    assert done.returncode == 1 and "no reply yet" in done.stderr
    pairwise, ranking = events_by_id(admin, FEEDBACK_ID.findall(done.stderr))
    assert pairwise["payload"] == {"winner": "tie", "choices": [0, 1]} and len(pairwise["choices"]) == 2
    assert ranking["payload"] == {"ranking": [3, 1]} and len(ranking["choices"]) == 4
    assert pairwise["prompt"] == ranking["prompt"] == [user("Tell me about comets.")]
    for text in ranking["choices"]:
        assert (text.split() or ["(empty)"])[0] in done.stdout, "the replies to rank were shown"


def test_pipe_reports_errors_in_plain_words(srv: AppServer) -> None:
    refused = run_chat(srv, "Hello\n", api_key="not-a-key")
    assert refused.returncode == 1 and refused.stdout == ""
    assert "refused the API key" in refused.stderr and "Traceback" not in refused.stderr
    missing = run_chat(srv, "Hello\n", "--model", "alignd@42")
    assert missing.returncode == 1 and "does not serve that model" in missing.stderr
    nowhere = subprocess.run([sys.executable, "-m", "alignd.cli", "chat", "--url", "http://127.0.0.1:9"],
                             input="Hello\n", capture_output=True, text=True, cwd=REPO, timeout=120)
    assert nowhere.returncode == 1 and "Cannot reach the alignd server" in nowhere.stderr
    usage = run_chat(srv, "/rate 11\n/rank 1\n/compare\n/bogus\n")
    assert usage.returncode == 1 and "Traceback" not in usage.stderr
    for message in ("Usage: /rate N", "Usage: /rank [N]", "Send a message first", "Unknown command /bogus"):
        assert message in usage.stderr


# --- in a terminal -------------------------------------------------------------------------------------------------


def test_terminal_compare_rank_edit(srv: AppServer, admin: Client, tmp_path: Path) -> None:
    editor = tmp_path / "fix-reply.sh"
    editor.write_text("#!/bin/sh\nprintf 'Knead it well and bake it hot.\\n' > \"$1\"\n")
    editor.chmod(0o755)
    env = {**os.environ, "ALIGND_API_KEY": USER, "EDITOR": str(editor), "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(sys.executable, ["-m", "alignd.cli", "chat", "--url", srv.url, "--max-tokens", "24"],
                          cwd=str(REPO), env=env, encoding="utf-8", timeout=120, dimensions=(50, 120))
    transcript: list[str] = []

    def expect(pattern: str) -> str:
        child.expect(pattern)
        transcript.append(child.before + child.after)
        return child.before

    try:
        expect("/help lists the commands")
        expect("you> ")
        child.sendline("How do I bake bread at home?")
        expect(r"\(policy-0\)")
        expect("you> ")
        child.sendline("/compare")
        shown = expect(r"Which is better\? \[1/2/tie/both-bad")
        child.sendline("2")
        expect("Comparison sent")
        expect("you> ")
        child.sendline("/rank")
        expect("Rank them best first")
        child.sendline("3 1")
        expect("Ranking sent")
        expect("you> ")
        child.sendline("/edit")
        expect("Correction sent")
        expect("you> ")
        child.sendline("And after that?")
        expect(r"\(policy-0\)")
        expect("you> ")
        child.sendline("/up")
        expect("Thumbs up sent")
        expect("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, "".join(transcript)
    output = "".join(transcript)
    assert "\x1b[" in output, "colours on a terminal"

    columns = [line for line in _plain(shown).splitlines() if "│" in line]
    assert columns and columns[0].startswith("Reply 1 (policy-0)") and "Reply 2 (policy-0)" in columns[0]
    assert all(len(line) <= 120 for line in columns), "the two columns fit the terminal"

    pairwise, ranking, edit, thumbs = events_by_id(admin, FEEDBACK_ID.findall(output))
    question = user("How do I bake bread at home?")
    assert pairwise["payload"] == {"winner": 1, "choices": [0, 1]} and pairwise["prompt"] == [question]
    left_words = " ".join(line.split("│")[0] for line in _plain(shown).splitlines() if "│" in line).split()
    assert left_words[3:] == pairwise["choices"][0].split(), "column 1 shows reply 1, wrapped"
    # /rank answers the same question again: the conversation continued with the compared reply 2 in its place.
    assert ranking["payload"] == {"ranking": [2, 0]} and len(ranking["choices"]) == 3
    assert ranking["prompt"] == [question]
    # /edit corrects the reply ranked best, and the correction continues the conversation.
    assert (edit["completion_id"], edit["choice"]) == (ranking["completion_id"], 2)
    assert edit["payload"] == {"text": "Knead it well and bake it hot.", "choice": 2}
    assert thumbs["prompt"] == [question, assistant("Knead it well and bake it hot."), user("And after that?")]


def _plain(text: str) -> str:
    """Terminal output without colour codes, readline markers and carriage returns."""
    return re.sub(r"\x1b\[[0-9;]*m|[\x01\x02\r]", "", text)


# --- the pieces ----------------------------------------------------------------------------------------------------


def test_side_by_side_fits_the_width_and_keeps_every_word() -> None:
    left = "In short, for baking bread: Preheat the oven and measure every ingredient. That is it."
    right = "Hi there! Happy to help with baking bread. I'd suggest you let the dough rest. Take care!"
    for width in (40, 61, 100):
        lines = side_by_side(left, right, width)
        assert all(len(line) <= width for line in lines)
        halves = [line.split("│") for line in lines]
        assert all(len(h) == 2 for h in halves)
        assert " ".join(h[0] for h in halves).split()[1:] == left.split()
        assert " ".join(h[1] for h in halves).split()[1:] == right.split()
    assert side_by_side("", "x", 60)[1].startswith("(empty)")


def test_parse_ranking() -> None:
    assert parse_ranking("2 1 3", 3) == [1, 0, 2]
    assert parse_ranking("3, 1", 4) == [2, 0]
    for bad in ("", "0 1", "1 1", "a b", "4", "1 2 3 4"):
        with pytest.raises(ValueError):
            parse_ranking(bad, 3)
