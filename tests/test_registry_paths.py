"""Where the registry finds a version's adapter: stored relative to the data dir, so a data dir restored elsewhere
still serves its versions; rows from before (absolute paths) still load where they were, or from the registry's own
folder once that path is gone."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from alignd.metrics import Metrics
from alignd.policies.registry import PolicyRegistry
from alignd.policies.router import PolicyRouter
from alignd.store import PolicyRow


def _row(version: int, adapter_path: str | None) -> PolicyRow:
    return PolicyRow(version=version, status="candidate", parent=0, run_id="run-1", adapter_path=adapter_path,
                     metrics={}, reason=None, created=datetime.now(UTC), promoted_at=None)


def test_adapter_folders_resolve_against_the_data_dir(tmp_path: Path) -> None:
    registry = PolicyRegistry(None, PolicyRouter("alignd", lambda: [0]), Metrics(),  # type: ignore[arg-type]
                              tmp_path / "restored" / "policies", max_rank=8, keep_loaded=1)
    assert registry.adapter_folder(_row(0, None)) is None
    assert registry.adapter_folder(_row(3, "policies/3")) == tmp_path / "restored" / "policies" / "3"
    old_home = tmp_path / "old" / "policies" / "2"
    old_home.mkdir(parents=True)
    assert registry.adapter_folder(_row(2, str(old_home))) == old_home  # an absolute path that still exists
    old_home.rmdir()
    assert registry.adapter_folder(_row(2, str(old_home))) == tmp_path / "restored" / "policies" / "2"
