"""The policy domain: which versions exist and which one serves a request.

- :mod:`~alignd.policies.registry`: versions, their adapters on disk, status, promotion and rollback;
- :mod:`~alignd.policies.router`: a request's ``model`` to a policy version (the promoted one, or a pinned one).
"""
