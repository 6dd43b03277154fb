#!/usr/bin/env bash
# The whole test suite from nothing: system packages, a virtual environment, the project, then lint + tests.
# Usage: ./test.sh [pytest args...]      (LDM_SDK_VENV picks the venv folder; default .venv)
set -euo pipefail
cd "$(dirname "$0")"

# -- system packages (Debian) ---------------------------------------------------------------------------
need_apt=()
command -v git >/dev/null || need_apt+=(git)
py=""
for cand in python3.13 python3.12 python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        py=$cand; break
    fi
done
if [ -z "$py" ]; then need_apt+=(python3 python3-venv python3-dev); fi
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
    py=python3
fi
# data the training/evaluation tests read (docs: offline assets): emoji font, clip-art, Fashion-MNIST
need_data=()
for pkg in fonts-noto-color-emoji openclipart-png dataset-fashion-mnist; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_data+=("$pkg")
done
if [ ${#need_data[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_data[@]}"
fi
# Prefer the interpreter the local torch wheels are built for.
if command -v python3.11 >/dev/null; then py=python3.11; fi

# -- virtual environment ------------------------------------------------------------------------------
venv=${LDM_SDK_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
stamp="$venv/.ldm-sdk-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ test.sh -nt "$stamp" ]; then
    # torch first and pinned, so nothing below pulls a different build
    "${pip[@]}" torch==2.14.1 torchvision==0.29.1
    "${pip[@]}" -e ".[test]"
    touch "$stamp"
fi

# -- lint + tests -------------------------------------------------------------------------------------
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
exec "$venv/bin/python" -m pytest -q "$@"
