"""``alignd chat``: a terminal chat with the served policy that turns your reactions into feedback.

Replies stream in as they are generated; each one is followed by the policy version that wrote it
(``policy-3``). Commands act on the last reply:

    /up, /down       thumbs up or down
    /rate N          a 1–10 score
    /compare         two fresh replies to the last prompt side by side; pick 1, 2, tie or both-bad
    /rank [N]        N fresh replies (default 3), numbered; rank them best first, e.g. "2 1 3"
    /edit            correct the reply in $EDITOR (or type it at the prompt)
    /comment TEXT    a comment sent with your next feedback (/comment alone drops it)
    /new, /help, /quit

The reply you pick (/compare, /rank) or write (/edit) continues the conversation. A line starting with ``//`` is
sent as a message starting with ``/``. When stdin is not a terminal (a pipe), each line is a prompt (or a command,
whose questions are answered by the next lines), each reply is printed to stdout as one block, and status lines go to
stderr, without prompts or colours.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from alignd.clients.sdk import (
    AligndError,
    APIConnectionError,
    APIError,
    AuthenticationError,
    Client,
    NotFoundError,
    PermissionDeniedError,
)
from alignd.protocol import FeedbackCreated

HELP = """Commands (they act on the last reply):
  /up, /down       thumbs up or down
  /rate N          score it from 1 (bad) to 10 (great)
  /compare         get two replies to the last prompt side by side and pick the better one
  /rank [N]        get N replies (default 3) to the last prompt and rank them, e.g. "2 1 3"
  /edit            correct the reply ($EDITOR if set, else type it here)
  /comment TEXT    attach a comment to your next feedback (/comment alone drops it)
  /new             start a new conversation
  /help            this list
  /quit            leave (or Ctrl-D)
The reply you pick or write continues the conversation. Start a message with // to send a leading /."""

# The temperature /compare and /rank use at least: near-greedy sampling gives the same reply twice.
MIN_COMPARE_TEMPERATURE = 0.7
MAX_RANK = 8


@dataclass
class LastReply:
    """The reply feedback commands act on."""

    completion_id: str
    choice: int
    text: str


class Console:
    """Terminal input and output. Interactive: prompts, colours (unless ``NO_COLOR``), readline editing.
    Over a pipe: no prompts or colours, replies on stdout, status lines on stderr."""

    def __init__(self, stdin: TextIO, stdout: TextIO, stderr: TextIO, *, interactive: bool | None = None,
                 color: bool | None = None) -> None:
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.interactive = stdin.isatty() if interactive is None else interactive
        self.color = (self.interactive and stdout.isatty() and "NO_COLOR" not in os.environ
                      and os.environ.get("TERM") != "dumb") if color is None else color
        if self.interactive and stdin is sys.stdin:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass

    def _paint(self, text: str, code: str, *, prompt: bool = False) -> str:
        if not self.color:
            return text
        # \001 and \002 tell readline that the escape codes take no room, so line editing stays aligned.
        start, end = ("\001", "\002") if prompt else ("", "")
        return f"{start}\033[{code}m{end}{text}{start}\033[0m{end}"

    def read(self, prompt: str) -> str | None:
        """One line, or None at end of input."""
        if not self.interactive:
            line = self.stdin.readline()
            return None if not line else line.rstrip("\r\n")
        try:
            return input(self._paint(prompt, "1;32", prompt=True))
        except EOFError:
            self.stdout.write("\n")
            return None

    def reply_part(self, text: str) -> None:
        """A piece of a reply, shown as it arrives."""
        self.stdout.write(self._paint(text, "36"))
        self.stdout.flush()

    def show(self, text: str) -> None:
        """Content the user asked for (replies to compare or rank): stdout either way."""
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def status(self, text: str) -> None:
        """A short status line (policy version, feedback sent)."""
        if self.interactive:
            self.stdout.write(self._paint(text, "2") + "\n")
            self.stdout.flush()
        else:
            self.stderr.write(text + "\n")
            self.stderr.flush()

    def error(self, text: str) -> None:
        stream = self.stdout if self.interactive else self.stderr
        stream.write(self._paint(text, "31") + "\n")
        stream.flush()

    @property
    def width(self) -> int:
        return max(40, shutil.get_terminal_size((100, 24)).columns)


def side_by_side(left: str, right: str, width: int, titles: tuple[str, str] = ("1", "2")) -> list[str]:
    """Two texts in two columns that together fit ``width`` characters, each wrapped to its column."""
    gap = " │ "
    column = max(10, (width - len(gap)) // 2)
    lefts = [titles[0], *textwrap.wrap(left, column)] if left.strip() else [titles[0], "(empty)"]
    rights = [titles[1], *textwrap.wrap(right, column)] if right.strip() else [titles[1], "(empty)"]
    rows = max(len(lefts), len(rights))
    lefts += [""] * (rows - len(lefts))
    rights += [""] * (rows - len(rights))
    return [f"{a:<{column}}{gap}{b}".rstrip() for a, b in zip(lefts, rights, strict=True)]


def parse_ranking(text: str, n: int) -> list[int]:
    """ "2 1 3" (1-based, best first; commas allowed; a prefix is fine) → 0-based indices; ValueError if invalid."""
    tokens = text.replace(",", " ").split()
    if not tokens:
        raise ValueError("Type the reply numbers best first, e.g. " + " ".join(str(i + 1) for i in range(n)) + ".")
    try:
        numbers = [int(t) for t in tokens]
    except ValueError:
        raise ValueError(f"Use reply numbers from 1 to {n}.") from None
    if any(not 1 <= k <= n for k in numbers):
        raise ValueError(f"Use reply numbers from 1 to {n}.")
    if len(set(numbers)) != len(numbers):
        raise ValueError("Name each reply at most once.")
    return [k - 1 for k in numbers]


_PAIRWISE_ANSWERS: dict[str, int | str] = {"1": 0, "2": 1, "tie": "tie", "t": "tie", "both-bad": "both_bad",
                                           "both_bad": "both_bad", "both bad": "both_bad", "b": "both_bad"}


def describe_error(error: AligndError, url: str) -> str:
    """A server or connection error in plain words, with what to do about it where that is clear."""
    if isinstance(error, APIConnectionError):
        return f"Cannot reach the alignd server at {url} ({error}). Is `alignd serve` running there?"
    if not isinstance(error, APIError):
        return f"Something went wrong: {error}"
    if isinstance(error, AuthenticationError):
        return f"The server refused the API key: {error.message} Use --api-key or set ALIGND_API_KEY."
    if isinstance(error, PermissionDeniedError):
        return f"Not allowed: {error.message}"
    if error.code == "context_length_exceeded":
        return "The conversation no longer fits in the model's context; /new starts a fresh one."
    if isinstance(error, NotFoundError) and error.code == "model_not_found":
        return f"The server does not serve that model: {error.message}"
    return f"The server could not do that ({error.status}): {error.message}"


class ChatSession:
    """One conversation with the server, and the feedback commands on its last reply."""

    def __init__(self, client: Client, console: Console, *, model: str = "alignd", temperature: float | None = None,
                 max_tokens: int | None = None, system: str | None = None,
                 editor: str | None = None) -> None:
        self.client = client
        self.console = console
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.system = system
        self.editor = editor if editor is not None else os.environ.get("EDITOR")
        self.messages: list[dict[str, str]] = []
        self.last: LastReply | None = None
        self.pending_comment: str | None = None
        self.commands: dict[str, Callable[[str], bool]] = {
            "/up": lambda _: self._thumbs("up"), "/down": lambda _: self._thumbs("down"), "/rate": self._rate,
            "/compare": self._compare, "/rank": self._rank, "/edit": self._edit, "/comment": self._comment,
            "/new": self._new, "/help": self._help, "/quit": lambda _: False, "/exit": lambda _: False,
        }
        self.failed = False
        self._reset()

    # --- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> int:
        if self.console.interactive:
            self.console.status(f"Chatting with {self.model} at {self.client.base_url}. /help lists the commands.")
        while True:
            try:
                line = self.console.read("you> ")
                if line is None or not self.handle(line):
                    # Over a pipe, a script learns from the status that some prompt or command failed.
                    return 1 if self.failed and not self.console.interactive else 0
            except KeyboardInterrupt:
                if not self.console.interactive:
                    raise
                # Ctrl-C at a prompt or in a command's question abandons it, as in a shell; Ctrl-D leaves.
                self.console.show("")

    def handle(self, line: str) -> bool:
        """Act on one input line; False to leave."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            name, _, argument = text.partition(" ")
            command = self.commands.get(name.lower())
            if command is None:
                self._error(f"Unknown command {name}; /help lists them.")
                return True
            try:
                return command(argument.strip())
            except AligndError as e:
                self._error(describe_error(e, self.client.base_url))
                return True
        self._say(text[1:] if text.startswith("//") else text)
        return True

    def _error(self, text: str) -> None:
        self.failed = True
        self.console.error(text)

    # --- chatting ------------------------------------------------------------------------------------------------

    def _sampling(self, n: int = 1) -> dict[str, Any]:
        temperature = self.temperature
        if n > 1:
            temperature = max(MIN_COMPARE_TEMPERATURE, 1.0 if temperature is None else temperature)
        return {"model": self.model, "n": n, "temperature": temperature, "max_tokens": self.max_tokens}

    def _say(self, text: str) -> None:
        """Send a user message and stream the reply."""
        history = [*self.messages, {"role": "user", "content": text}]
        parts: list[str] = []
        completion_id = fingerprint = None
        try:
            with self.client.chat(history, stream=True, **self._sampling()) as stream:
                for chunk in stream:
                    completion_id, fingerprint = chunk.id, chunk.system_fingerprint
                    for choice in chunk.choices:
                        if choice.delta.content:
                            parts.append(choice.delta.content)
                            self.console.reply_part(choice.delta.content)
        except KeyboardInterrupt:
            self.console.show("")
            self.console.status("(stopped; that reply is not part of the conversation)")
            return
        except AligndError as e:
            if parts:
                self.console.show("")
            self._error(describe_error(e, self.client.base_url))
            return
        self.console.show("")
        reply = "".join(parts)
        assert completion_id is not None  # a finished stream has at least its role chunk
        self.messages = [*history, {"role": "assistant", "content": reply}]
        self.last = LastReply(completion_id, 0, reply)
        self.console.status(f"({fingerprint})")

    def _alternatives(self, n: int) -> tuple[str, list[str], str] | None:
        """``n`` fresh replies to the last prompt: completion id, texts, fingerprint; None if there is no prompt."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            self._error("Send a message first: this needs a prompt to answer again.")
            return None
        self.console.status(f"(asking for {n} replies...)")
        answer = self.client.chat(self.messages[:-1], **self._sampling(n))
        texts = [c.message.content for c in sorted(answer.choices, key=lambda c: c.index)]
        return answer.id, texts, answer.system_fingerprint

    def _continue_with(self, completion_id: str, choice: int, text: str) -> None:
        """Make a picked or corrected reply the conversation's last turn."""
        self.messages[-1] = {"role": "assistant", "content": text}
        self.last = LastReply(completion_id, choice, text)

    # --- feedback ------------------------------------------------------------------------------------------------

    def _common(self) -> dict[str, Any]:
        """Fields sent with every feedback: the pending comment, which is then used up."""
        comment, self.pending_comment = self.pending_comment, None
        return {"comment": comment} if comment else {}

    def _sent(self, what: str, created: FeedbackCreated) -> None:
        self.console.status(f"{what} sent ({created.id}).")

    def _need_last(self) -> LastReply | None:
        if self.last is None:
            self._error("There is no reply yet to give feedback on.")
        return self.last

    def _thumbs(self, value: str) -> bool:
        if last := self._need_last():
            self._sent(f"Thumbs {value}", self.client.feedback.thumbs(
                last.completion_id, value="up" if value == "up" else "down", choice=last.choice, **self._common()))
        return True

    def _rate(self, argument: str) -> bool:
        if not argument.isdigit() or not 1 <= int(argument) <= 10:
            self._error("Usage: /rate N, with N from 1 (bad) to 10 (great).")
            return True
        if last := self._need_last():
            self._sent(f"Rating {argument}/10", self.client.feedback.rate(
                last.completion_id, int(argument), choice=last.choice, **self._common()))
        return True

    def _compare(self, _: str) -> bool:
        found = self._alternatives(2)
        if found is None:
            return True
        completion_id, texts, fingerprint = found
        titles = (f"Reply 1 ({fingerprint})", f"Reply 2 ({fingerprint})")
        self.console.show("\n".join(side_by_side(texts[0], texts[1], self.console.width, titles)))
        while True:
            answer = self.console.read("Which is better? [1/2/tie/both-bad, Enter to skip] ")
            if answer is None or not answer.strip():
                self.console.status("No feedback sent.")
                return answer is not None
            winner = _PAIRWISE_ANSWERS.get(answer.strip().lower())
            if winner is not None:
                break
            self._error("Answer 1, 2, tie or both-bad.")
        self._sent("Comparison", self.client.feedback.pairwise(completion_id, winner=winner, **self._common()))
        if isinstance(winner, int):
            self._continue_with(completion_id, winner, texts[winner])
        return True

    def _rank(self, argument: str) -> bool:
        if argument and (not argument.isdigit() or not 2 <= int(argument) <= MAX_RANK):
            self._error(f"Usage: /rank [N], with N from 2 to {MAX_RANK} (default 3).")
            return True
        found = self._alternatives(int(argument or 3))
        if found is None:
            return True
        completion_id, texts, fingerprint = found
        width = self.console.width
        for number, text in enumerate(texts, 1):
            self.console.show(textwrap.fill(text or "(empty)", width, initial_indent=f"[{number}] ",
                                            subsequent_indent="    "))
        self.console.status(f"({fingerprint})")
        while True:
            answer = self.console.read("Rank them best first (e.g. 2 1 3), Enter to skip: ")
            if answer is None or not answer.strip():
                self.console.status("No feedback sent.")
                return answer is not None
            try:
                ranking = parse_ranking(answer, len(texts))
                break
            except ValueError as e:
                self._error(str(e))
        self._sent("Ranking", self.client.feedback.rank(completion_id, ranking, **self._common()))
        self._continue_with(completion_id, ranking[0], texts[ranking[0]])
        return True

    def _edit(self, _: str) -> bool:
        last = self._need_last()
        if last is None:
            return True
        text = self._edit_in_editor(last.text) if self.editor else self._edit_at_prompt(last.text)
        if text is None or not text.strip() or text.strip() == last.text.strip():
            self.console.status("Unchanged; no feedback sent.")
            return True
        text = text.strip()
        self._sent("Correction", self.client.feedback.edit(last.completion_id, text, choice=last.choice,
                                                           **self._common()))
        self._continue_with(last.completion_id, last.choice, text)
        return True

    def _edit_in_editor(self, text: str) -> str | None:
        assert self.editor is not None
        with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="alignd-reply-", delete=False) as f:
            f.write(text + "\n")
            path = f.name
        try:
            result = subprocess.run([*shlex.split(self.editor), path], check=False)
            if result.returncode != 0:
                self._error(f"The editor ({self.editor}) exited with status {result.returncode}.")
                return None
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            self._error(f"Could not run the editor ({self.editor}): {e}")
            return None
        finally:
            os.unlink(path)

    def _edit_at_prompt(self, text: str) -> str | None:
        self.console.show(textwrap.fill(text, self.console.width, initial_indent="Current: ",
                                        subsequent_indent="         "))
        return self.console.read("Corrected reply (one line, Enter to cancel): ")

    def _comment(self, argument: str) -> bool:
        self.pending_comment = argument or None
        self.console.status("Your next feedback will carry that comment." if argument else "Comment dropped.")
        return True

    # --- housekeeping --------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.last = None

    def _new(self, _: str) -> bool:
        self._reset()
        self.console.status("New conversation.")
        return True

    def _help(self, _: str) -> bool:
        self.console.show(HELP)
        return True


def main(*, url: str, api_key: str | None, model: str = "alignd", temperature: float | None = None,
         max_tokens: int | None = None, system: str | None = None) -> int:
    """``alignd chat``: chat on this terminal (or over a pipe) until /quit or end of input."""
    console = Console(sys.stdin, sys.stdout, sys.stderr)
    with Client(url, api_key=api_key) as client:
        session = ChatSession(client, console, model=model, temperature=temperature, max_tokens=max_tokens,
                              system=system)
        try:
            return session.run()
        except KeyboardInterrupt:
            console.show("")
            return 130
