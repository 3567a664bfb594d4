#!/usr/bin/env bash
# The project's test command: set up .venv (idempotent, scripts/setup_env.sh), then run pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k schedule
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup_env.sh"
cd "$repo"
exec "${MICROMOE_VENV:-$repo/.venv}/bin/python" -m pytest "$@"
