#!/usr/bin/env bash
# Create the project's virtualenv (.venv, or $LOOM_VENV) and install Loom with the exact pins this
# CPU machine's CI uses. Idempotent: a stamp keyed on setup.cfg + constraints.txt skips the work
# when nothing changed. GPU clusters install with `pip install -e .` and the ranges in setup.cfg.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${LOOM_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
stamp="$venv/.loom-install-$(cat setup.cfg constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing Loom into $venv (pinned by constraints.txt) ..."
  "$venv/bin/pip" install -q --upgrade pip
  # torch first and by exact version: this machine's CPU wheel, never an unpinned (CUDA) download
  "$venv/bin/pip" install -q "torch==2.13.0"
  "$venv/bin/pip" install -q -c constraints.txt -e ".[dev]"
  rm -f "$venv"/.loom-install-*
  touch "$stamp"
fi
