"""Settings: alignd.toml < ALIGND_* environment < flags; validation names the key; --help documents every option."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from alignd.cli import build_parser
from alignd.config import OPTIONS, ConfigError, Settings, add_arguments, cli_values, load_settings


def parse(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return cli_values(parser.parse_args(argv))


def test_defaults() -> None:
    s = load_settings({}, environ={})
    assert s.model is None and s.served_name == "alignd" and s.data_dir == ".alignd"
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8000)
    assert s.database_url == f"sqlite:///{Path('.alignd').resolve() / 'alignd.db'}"


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "alignd.toml"
    config.write_text('model = "from-file"\nserved_name = "file"\n[server]\nport = 7000\nhost = "0.0.0.0"\n'
                      "[engine]\nmax_loras = 3\nenforce_eager = false\n")
    env = {"ALIGND_PORT": "7100", "ALIGND_SERVED_NAME": "env", "ALIGND_API_KEY": "k1, k2",
           "ALIGND_ENFORCE_EAGER": "true", "ALIGND_DATABASE": "postgresql://u:p@localhost/db"}
    s = load_settings(parse("--port", "7200", "--admin-key", "a1", "--admin-key", "a2"), config_file=config,
                      environ=env)
    assert s.model == "from-file"  # only in the file
    assert s.server.host == "0.0.0.0"
    assert s.served_name == "env"  # env beats file
    assert s.server.port == 7200  # flag beats env
    assert s.server.api_keys == ["k1", "k2"] and s.server.admin_keys == ["a1", "a2"]
    assert s.engine.max_loras == 3 and s.engine.enforce_eager is True
    assert s.database_url == "postgresql://u:p@localhost/db"


def test_alignd_config_env_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "other.toml"
    config.write_text('data_dir = "/srv/alignd"\n')
    assert load_settings({}, environ={"ALIGND_CONFIG": str(config)}).data_dir == "/srv/alignd"


@pytest.mark.parametrize(("text", "expected"), [
    ("[engine]\nmax_loras = 0\n", "engine.max_loras (--max-loras)"),
    ("[server]\nport = 70000\n", "server.port (--port)"),
    ("[server]\nport = 'eighty'\n", "server.port (--port)"),
    ("[engine]\ngpu_memory_utilization = 1.5\n", "engine.gpu_memory_utilization"),
    ("colour = 'blue'\n", "unknown key `colour`"),
    ("[engine]\nmax_lora = 3\n", "unknown key `max_lora`"),
    ("[server\n", "not valid TOML"),
])
def test_invalid_config_names_the_key(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "alignd.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings({}, config_file=config, environ={})
    assert expected in str(info.value)


def test_invalid_environment_value_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, environ={"ALIGND_MAX_N": "many"})
    assert "server.max_n (--max-n)" in str(info.value)


def test_required_flags_exist_with_env_twins() -> None:
    flags = {o.flag: o.env for o in OPTIONS}
    for flag in ("host", "port", "model", "data-dir", "database", "api-key", "admin-key", "dtype", "max-model-len",
                 "gpu-memory-utilization", "kv-cache-space-gib", "max-loras", "max-lora-rank", "enforce-eager",
                 "tensor-parallel-size", "shutdown-grace-s", "max-body-bytes", "max-n"):
        assert flag in flags
        assert flags[flag] == "ALIGND_" + flag.upper().replace("-", "_")


def test_serve_help_documents_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "alignd.cli", "serve", "--help"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    for option in OPTIONS:
        assert f"--{option.flag}" in out, option.flag
        assert option.env in out.replace("\n", " ").replace("  ", " ") or option.env in out
    assert "--config" in out


def test_every_setting_has_a_description() -> None:
    assert all(o.help for o in OPTIONS), [o.flag for o in OPTIONS if not o.help]
    assert Settings.__doc__
    assert build_parser().prog == "alignd"


# --- one trainer settings tree ---------------------------------------------------------------------------------

# [trainer] settings the server uses itself (when to start a run, how long it may take, its threads): not the run's.
_SERVER_SIDE = {"training_trigger", "min_new_pairs", "min_new_labels", "min_interval_s", "run_timeout_s",
                "trainer_threads", "canary_share", "canary_side_by_side", "canary_confidence", "canary_max_s",
                "canary_max_requests", "canary_check_s", "canary_min_completions", "canary_max_latency_ratio"}


def test_the_trainer_defaults_are_the_settings_defaults() -> None:
    """The trainer's dataclasses (used directly by tests and benchmarks) and a server with default settings train
    with the same figures: there is one set of defaults."""
    from alignd.config import TrainerSettings
    from alignd.trainer.config import TrainerConfig, trainer_config

    assert trainer_config(TrainerSettings()) == TrainerConfig()


def test_every_trainer_setting_reaches_the_run_or_the_server() -> None:
    """A [trainer] setting that changes nothing in a run's config must be one the server uses itself."""
    import msgspec

    from alignd.config import TrainerSettings
    from alignd.trainer.config import trainer_config

    defaults = TrainerSettings()
    baseline = trainer_config(defaults)
    changed = {"trainer_device": "cpu", "trainer_dtype": "float32", "ppo_time_limit_s": 60.0, "objective": "grpo",
               "trainer_distributed": "fsdp"}
    for name in msgspec.structs.fields(TrainerSettings):
        if name.name in _SERVER_SIDE:
            continue
        value = changed.get(name.name)
        if value is None:
            default = getattr(defaults, name.name)
            value = default + 1 if isinstance(default, int | float) else default
        settings = msgspec.structs.replace(defaults, **{name.name: value})
        assert trainer_config(settings) != baseline, f"[trainer] {name.name} does not reach the run's config"


def test_the_training_docs_list_every_trainer_flag_with_its_default() -> None:
    """docs/training.md's flag table names each [trainer] option once, with the default the CLI has."""
    documented: dict[str, str] = {}
    for line in (Path(__file__).parents[1] / "docs" / "training.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`--"):
            flags = [f.strip(" `") for f in cells[0].split(",")]
            defaults = [d.strip(" `") for d in cells[1].split(",")]
            documented.update(zip(flags, defaults if len(defaults) == len(flags) else defaults * len(flags),
                                  strict=True))
    options = {f"--{o.flag}": o.default for o in OPTIONS if o.path[0] == "trainer"}
    assert documented.keys() == options.keys()
    for flag, default in options.items():
        text = documented[flag]
        if default is None:
            assert text == "unset", flag
        elif isinstance(default, bool):
            assert text == ("on" if default else "off"), flag
        elif isinstance(default, int | float) and flag != "--trainer-threads":  # 0 means "half the CPUs"
            assert float(text) == default, flag
        elif isinstance(default, str):
            assert text == default, flag


def test_a_run_request_overrides_the_settings_budget() -> None:
    """POST /v1/training/runs may change a run's budget; what it leaves out comes from the [trainer] settings."""
    from alignd.config import TrainerSettings
    from alignd.protocol import TrainingRunRequest
    from alignd.trainer.config import trainer_config

    settings = TrainerSettings(ppo_iterations=3, rollout_batch_size=16, ppo_time_limit_s=90.0)
    ppo = trainer_config(settings, TrainingRunRequest(iterations=5, time_limit_s=30.0)).ppo
    assert (ppo.iterations, ppo.rollout_batch_size, ppo.time_limit_s) == (5, 16, 30.0)
    ppo = trainer_config(settings, TrainingRunRequest()).ppo
    assert (ppo.iterations, ppo.rollout_batch_size, ppo.time_limit_s) == (3, 16, 90.0)
