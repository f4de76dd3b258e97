"""Who is calling, and what each role may do with completions and feedback.

A principal is what an API key stands for: a name and a role (``user``, ``frontend``, ``admin``; see
:data:`alignd.protocol.PrincipalRole`). Several keys may stand for one principal (rotation). The chat and feedback
services apply these rules; :mod:`alignd.keys` turns keys into principals and :mod:`alignd.auth` guards the routes.
A request without a principal (None) comes from an open server's anonymous caller, or from trusted server-side code
(a plugin route that checked its callers itself): nothing is owned, as before keys had identities.
"""

from __future__ import annotations

import msgspec

from alignd.errors import Forbidden
from alignd.protocol import PrincipalRole

__all__ = ["Principal", "acting_user", "check_may_judge"]


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """The caller a valid key stands for."""

    name: str
    role: PrincipalRole
    key_id: str
    """The key it came with (``config-…`` or a stored key's id): for logs and audits, never the key itself."""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def acting_user(principal: Principal | None, asserted: str | None) -> str | None:
    """The end user a chat or feedback request acts for. A ``user`` key is its own end user: its name, and a
    ``user`` field naming someone else is refused (403) rather than ignored, so that a client cannot believe it
    acted for another. ``frontend`` and ``admin`` keys (and keyless callers) name the user they act for, if any."""
    if principal is None or principal.role != "user":
        return asserted
    if asserted is not None and asserted != principal.name:
        raise Forbidden(
            f"This key acts for user {principal.name!r}; it cannot set 'user' to {asserted!r}.",
            param="user",
            code="user_not_allowed",
        )
    return principal.name


def check_may_judge(principal: Principal | None, completion_id: str, owner: str | None) -> None:
    """Refuse (403) feedback from ``principal`` on a completion that ``owner`` (the principal that made it; None for
    one made without a key) made: ``user`` and ``frontend`` keys judge their own completions only, admins any."""
    if principal is None or principal.is_admin or (owner is not None and owner == principal.name):
        return
    raise Forbidden(
        f"Completion {completion_id!r} was not made with this key's principal ({principal.name!r}); "
        "only its own principal or an admin may give feedback on it.",
        param="completion_id",
        code="not_your_completion",
    )
