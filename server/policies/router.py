"""Which policy version serves a request: the promoted one for the served name (or, for a share of its users, the
canary under live test), or a pinned ``name@<version>``; and how the requests each version served ended."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from alignd.errors import NotFound

RESERVED_VERSIONS = 1_000_000_000
"""Versions from here up are the trainer's (rollout adapters): loaded in the engine, never served to users."""


@dataclass
class Canary:
    """A version answering a share of the served name's users while it is tested live against the promoted one."""

    version: int
    share: float
    """Share of users (by a stable hash of who they are) routed to it, in (0, 1)."""
    side_by_side: bool = False
    """Requests for several choices get half from the canary, half from the promoted version, in random order."""
    held_back: bool = False
    """Not every live replica has it loaded yet: it gets no traffic until they do (then ``share``)."""


@dataclass
class Tally:
    """Requests each version served and how many of them failed (the canary's error rate), since a reset."""

    requests: dict[int, int] = field(default_factory=dict)
    errors: dict[int, int] = field(default_factory=dict)

    def record(self, version: int, ok: bool) -> None:
        self.requests[version] = self.requests.get(version, 0) + 1
        if not ok:
            self.errors[version] = self.errors.get(version, 0) + 1


def in_canary(who: str, version: int, share: float) -> bool:
    """Whether user ``who`` belongs to the canary of ``version``: a stable hash, so the same user gets the same
    policy for the whole experiment (and a new experiment draws its users afresh)."""
    digest = hashlib.sha256(f"{version}\0{who}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


class PolicyRouter:
    """Maps model names to policy versions. Swapping ``promoted`` (or the canary) is atomic for new requests;
    running ones keep the version they were routed to."""

    def __init__(self, served_name: str, loaded_versions: Callable[[], list[int]], promoted: int = 0) -> None:
        self.served_name = served_name
        self._loaded = loaded_versions
        self.promoted = promoted
        self.canary: Canary | None = None
        self.tally = Tally()

    def resolve(self, model: str, who: str | None = None) -> int:
        """The policy version for a request's ``model`` field, made by user ``who`` (the end user, else the key's
        principal; None: an anonymous request, which joins the canary by chance, not stickily); unknown names and
        unloaded versions are 404."""
        if model == self.served_name:
            canary = self.canary
            if canary is not None and canary.version != self.promoted and not canary.held_back:
                joins = in_canary(who, canary.version, canary.share) if who else random.random() < canary.share
                if joins:
                    return canary.version
            return self.promoted
        name, sep, version = model.rpartition("@")
        if sep and name == self.served_name and version.isdigit() and int(version) in self.versions():
            return int(version)
        raise NotFound(f"The model '{model}' does not exist; see GET /v1/models.", param="model",
                       code="model_not_found")

    def side_by_side(self, model: str) -> tuple[int, int] | None:
        """``(canary, promoted)`` when a request for ``model`` with several choices is to be a blind side-by-side."""
        canary = self.canary
        if (model != self.served_name or canary is None or not canary.side_by_side or canary.held_back
                or canary.version == self.promoted):
            return None
        return canary.version, self.promoted

    def model_names(self) -> list[str]:
        """The served name, then each loaded version pinned."""
        return [self.served_name, *(f"{self.served_name}@{v}" for v in self.versions())]

    def versions(self) -> list[int]:
        """Loaded versions users may pin (the trainer's reserved ones hidden)."""
        return [v for v in self._loaded() if v < RESERVED_VERSIONS]
