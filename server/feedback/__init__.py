"""The feedback domain: what end users say about completions, turned into training signal by plugins.

- :mod:`~alignd.feedback.hookspecs`: the hook specifications (nothing else);
- :mod:`~alignd.feedback.types`: what plugins work with (event, signal, rejection, context);
- :mod:`~alignd.feedback.manager`: which plugins load (built-ins, entry points, allow and block lists);
- :mod:`~alignd.feedback.service`: a submission through the hooks into the store, and the export;
- :mod:`~alignd.feedback.sinks`: ``on_feedback`` delivered off the request path.

Plugin authors import from :mod:`alignd` only.
"""
