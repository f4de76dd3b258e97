"""Training runs as several processes (--trainer-processes, alignd.trainer.distributed) on the CPU with gloo.

Two ranks, each on its share of every minibatch with gradients summed, take the step one process takes on the whole
minibatch: the same PPO update (policy and critic), GRPO update and reward-model fit from the same fixed inputs,
within float tolerance; so do two ranks with the base sharded over them (FSDP2), and the candidate a sharded run saves
loads as the policy it trained. Then through the real server: a run as two processes succeeds and registers its
candidate (with ddp and with fsdp), and a rank killed mid-run fails the run cleanly while serving goes on.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alignd.faults import FAILPOINT_ENV
from alignd.trainer.config import TrainerConfig
from alignd.trainer.distributed import free_port
from alignd.trainer.models import POLICY, load_stack
from tests.distributed_steps import steps
from tests.serverkit import AppServer
from tests.test_training import admin, app_factory, chat, give_feedback, wait_run  # noqa: F401 (a fixture)


def _run(tiny_model_dir: Path, out: Path, world: int, strategy: str = "ddp") -> dict[str, object]:
    out.mkdir()
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [ctx.Process(target=steps, args=(rank, world, port, str(tiny_model_dir), str(out), strategy))
                 for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(300)
        assert process.exitcode == 0, f"rank exited with {process.exitcode}"
    return {rank: load_file(str(out / f"rank{rank}.safetensors")) for rank in range(world)}  # type: ignore[misc]


@pytest.fixture(scope="module")
def one_process(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The steps as one process (``rank0.*`` in the folder returned)."""
    out = tmp_path_factory.mktemp("steps") / "one"
    _run(tiny_model_dir, out, 1)
    return out


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``two_ranks(strategy)``: the folder of the steps as two ranks with ``strategy`` (run once per module)."""
    runs: dict[str, Path] = {}

    def run(strategy: str) -> Path:
        if strategy not in runs:
            runs[strategy] = tmp_path_factory.mktemp(strategy) / "two"
            _run(tiny_model_dir, runs[strategy], 2, strategy)
        return runs[strategy]

    return run


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_take_the_step_one_process_takes(one_process: Path, two_ranks: Callable[[str], Path],
                                                   strategy: str) -> None:
    one = load_file(str(one_process / "rank0.safetensors"))
    out = two_ranks(strategy)
    two = {r: load_file(str(out / f"rank{r}.safetensors")) for r in range(2)}
    held = [float((out / f"rank{r}.held").read_text()) for r in range(2)]
    if strategy == "fsdp":  # each rank held half of the base (its shards), not the whole of it
        assert all(0.45 < h < 0.55 for h in held), held
    else:
        assert held == [1.0, 1.0]
    assert set(one) == set(two[0]) == set(two[1])  # type: ignore[arg-type]
    for name, value in one.items():  # type: ignore[attr-defined]
        assert (two[0][name] == two[1][name]).all(), f"{name}: the ranks disagree"  # type: ignore[index]
        assert (two[0][name] - value).abs().max() < 2e-5, name  # type: ignore[index]
    # The updates are real: each trained tensor moved by far more than the two runs differ.
    for role in ("policy", "grpo", "reward"):
        moved = max((one[f"{role}/{k}"] - one[f"before/{role}/{k}"]).abs().max().item()  # type: ignore[index]
                    for k in (n.split("/", 2)[2] for n in one if n.startswith(f"before/{role}/")))  # type: ignore[attr-defined]
        assert moved > 1e-3, (role, moved)
    figures = [(d / "rank0.figures").read_text().split() for d in (one_process, out)]
    assert figures[0][-1] == figures[1][-1]  # reward-model steps
    for a, b in zip(figures[0][:-1], figures[1][:-1], strict=True):
        assert float(a) == pytest.approx(float(b), rel=1e-5, abs=1e-7)  # losses, approx KL, GRPO's KL term


def test_the_candidate_a_sharded_run_saves_loads_as_its_policy(tiny_model_dir: Path, one_process: Path,
                                                               two_ranks: Callable[[str], Path]) -> None:
    out = two_ranks("fsdp")
    trained = load_file(str(out / "rank0.safetensors"))  # rank 0's policy after PPO and GRPO
    stack = load_stack(tiny_model_dir, TrainerConfig(device="cpu", dtype="float32", seed=99))  # another start
    stack.load_adapter("candidate", out / "candidate")  # beside the fresh policy (PEFT keeps one adapter at least)
    loaded = {k.replace(".candidate.", f".{POLICY}."): v for k, v in stack.adapter_state("candidate").items()}
    assert set(loaded) == {k.removeprefix("grpo/") for k in trained if k.startswith("grpo/")}
    for name, value in loaded.items():
        assert (value == trained[f"grpo/{name}"]).all(), name  # exactly what rank 0 held
    one = load_file(str(one_process / "rank0.safetensors"))
    assert max((value - one[f"grpo/{name}"]).abs().max().item() for name, value in loaded.items()) < 2e-5


def test_trainer_processes_0_is_refused_before_anything_starts() -> None:
    r = subprocess.run([sys.executable, "-m", "alignd.cli", "serve", "--trainer-processes", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--trainer-processes" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def srv(app_factory: Callable[..., AppServer],  # noqa: F811 (the fixture)
        tmp_path_factory: pytest.TempPathFactory) -> AppServer:
    """A server whose runs are two processes (one PPO iteration each)."""
    server = app_factory(tmp_path_factory.mktemp("distributed"), ppo_iterations=1, trainer_processes=2)
    give_feedback(server, n_prompts=8)
    return server


def test_a_rank_that_dies_fails_the_run_and_serving_goes_on(srv: AppServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAILPOINT_ENV, "trainer:rank1:sync")  # rank 1 SIGKILLed at its first gradient sum
    started = admin(srv, "POST", "/v1/training/runs")
    assert started.status_code == 202, started.text
    run = wait_run(srv, started.json()["id"])
    assert run["status"] == "failed", run
    assert "trainer rank 1 of 2 ended (killed by signal 9)" in run["error"], run["error"]
    assert run["candidate"] is None and run["promoted"] is False
    assert chat(srv, "Hello").json()["system_fingerprint"] == "policy-0"


def test_a_run_as_two_processes_trains_and_registers_its_candidate(srv: AppServer) -> None:
    run = wait_run(srv, admin(srv, "POST", "/v1/training/runs").json()["id"])
    assert run["status"] == "succeeded", run["error"]
    assert run["metrics"]["data"]["processes"] == 2
    assert run["metrics"]["distributed"] == {"processes": 2, "backend": "gloo", "strategy": "ddp"}
    assert run["candidate"] is not None and run["promoted"] is True
    versions = [p["version"] for p in admin(srv, "GET", "/v1/policies").json()["data"]]
    assert run["candidate"] in versions
    assert chat(srv, "Hello").json()["system_fingerprint"] == f"policy-{run['candidate']}"


def test_a_run_with_the_base_sharded_over_two_processes_trains_and_registers_its_candidate(
        app_factory: Callable[..., AppServer], tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    srv = app_factory(tmp_path, ppo_iterations=1, trainer_processes=2, trainer_distributed="fsdp")
    give_feedback(srv, n_prompts=8)
    run = wait_run(srv, admin(srv, "POST", "/v1/training/runs").json()["id"])
    assert run["status"] == "succeeded", run["error"]
    assert run["metrics"]["distributed"] == {"processes": 2, "backend": "gloo", "strategy": "fsdp"}
    assert run["candidate"] is not None and run["promoted"] is True
    assert chat(srv, "Hello").json()["system_fingerprint"] == f"policy-{run['candidate']}"
