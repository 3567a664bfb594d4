#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with the pinned CPU stack.
# Idempotent: a stamp file records the hash of the requirements; nothing is reinstalled when it
# matches. Usage: scripts/setup_env.sh   (env: MICROMOE_VENV to put the venv elsewhere)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MICROMOE_VENV:-$repo/.venv}

find_python() {
  # megatron-core 0.19.2 needs Python >= 3.12: try PATH first, then pyenv's installs.
  local candidates=(python3.13 python3.12 python3)
  local c
  for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for c in "$(pyenv root)"/versions/3.12*/bin/python "$(pyenv root)"/versions/3.13*/bin/python; do
      if [ -x "$c" ]; then echo "$c"; return 0; fi
    done
  fi
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  if ! py=$(find_python); then
    echo "setup_env: no Python >= 3.12 found (megatron-core 0.19.2 requires it)." >&2
    echo "  Install one (e.g. 'pyenv install 3.12' or your OS package python3.12) and re-run." >&2
    exit 1
  fi
  echo "setup_env: creating $venv with $py ($("$py" --version))"
  "$py" -m venv "$venv"
fi

stamp="$venv/.micromoe-requirements.sha256"
want=$(cat "$repo/requirements-cpu.txt" "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup_env: $venv is up to date"
  exit 0
fi
echo "setup_env: installing the pinned stack into $venv (first time: a few minutes, ~5.5 GB)"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r "$repo/requirements-cpu.txt"
"$venv/bin/python" -m pip install --quiet --no-deps -e "$repo"
echo "$want" > "$stamp"
echo "setup_env: done ($("$venv/bin/python" -c 'import torch, megatron.core, highspy; print("torch", torch.__version__, "megatron-core", megatron.core.__version__)'))"
