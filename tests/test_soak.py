"""bench/soak.py, briefly: a real `alignd serve` on the demo model under steady chat and feedback for 30 seconds, with
a training run started through the API. Everything the server acknowledged is in its SQLite file, and nothing
answered an error. (The figures, latency and memory, belong to the full run in docs/benchmarks.md, not here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_short_soak_loses_nothing(demo_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--duration", "30", "--train-after-s", "5", "--runs", "1",
         "--serve-candidate-s", "5", "--model", str(demo_model_dir), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["requests"] > 0 and result["acknowledged"]["completions"] > 0
    assert result["acknowledged"]["feedback"] > 0
    assert result["acknowledged"] == result["stored"]
    assert result["acknowledged_missing"] == {"completions": [], "feedback": []}
    assert result["errors"] == {} and result["server_errors_5xx"] == 0
    assert result["health_after"] == {"health": 200, "ready": 200}
    assert any(event["event"] == "run started" for event in result["operator"])
    assert len(result["rss"]["samples"]) >= 2
