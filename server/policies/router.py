"""Which policy version serves a request: the promoted one for the served name, or a pinned ``name@<version>``."""

from __future__ import annotations

from collections.abc import Callable

from alignd.errors import NotFound

RESERVED_VERSIONS = 1_000_000_000
"""Versions from here up are the trainer's (rollout adapters): loaded in the engine, never served to users."""


class PolicyRouter:
    """Maps model names to policy versions. Swapping ``promoted`` is atomic for new requests; running ones keep
    the version they were routed to."""

    def __init__(self, served_name: str, loaded_versions: Callable[[], list[int]], promoted: int = 0) -> None:
        self.served_name = served_name
        self._loaded = loaded_versions
        self.promoted = promoted

    def resolve(self, model: str) -> int:
        """The policy version for a request's ``model`` field; unknown names and unloaded versions are 404."""
        if model == self.served_name:
            return self.promoted
        name, sep, version = model.rpartition("@")
        if sep and name == self.served_name and version.isdigit() and int(version) in self.versions():
            return int(version)
        raise NotFound(f"The model '{model}' does not exist; see GET /v1/models.", param="model",
                       code="model_not_found")

    def model_names(self) -> list[str]:
        """The served name, then each loaded version pinned."""
        return [self.served_name, *(f"{self.served_name}@{v}" for v in self.versions())]

    def versions(self) -> list[int]:
        """Loaded versions users may pin (the trainer's reserved ones hidden)."""
        return [v for v in self._loaded() if v < RESERVED_VERSIONS]
