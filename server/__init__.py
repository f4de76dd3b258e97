"""alignd: a plugin-based chatbot alignment server.

This module is the public surface for plugin authors, like ``import llm`` for llm's plugins::

    from alignd import Feedback, RegisterKind, Signal, PreferencePair, hookimpl

Everything a feedback plugin works with is importable from here; the rest of the package (``alignd.feedback``,
``alignd.store``, ``alignd.trainer``, …) is the server's own and may change between releases. Importing this module
is light: no torch, vLLM or web framework.
"""

from alignd.errors import InvalidFeedback
from alignd.feedback.hookspecs import hookimpl
from alignd.feedback.types import (
    Converter,
    Feedback,
    FeedbackKind,
    FeedbackSubmitter,
    PluginContext,
    RegisterKind,
    RegisterRoute,
    Rejection,
    Signal,
    choice_text,
    completion_prompt,
    feedback_event,
)
from alignd.messages import plain_messages
from alignd.store.records import ChoiceRecord, CompletionRecord, Label, PreferencePair

__all__ = [
    "ChoiceRecord",
    "CompletionRecord",
    "Converter",
    "Feedback",
    "FeedbackKind",
    "FeedbackSubmitter",
    "InvalidFeedback",
    "Label",
    "PluginContext",
    "PreferencePair",
    "RegisterKind",
    "RegisterRoute",
    "Rejection",
    "Signal",
    "choice_text",
    "completion_prompt",
    "feedback_event",
    "hookimpl",
    "plain_messages",
]
