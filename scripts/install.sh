#!/usr/bin/env bash
# Install Nexus with everything the local cluster and the tests need (CPU only; no Docker, no GPU).
# torch first, pinned, so pip takes the local CPU wheel instead of several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
# Headless Chromium and its driver for the browser tests (Flower, the console), from Debian's packages.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q chromium chromium-driver >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
  else
    echo "install chromium and chromedriver for the browser tests" >&2
  fi
fi
python -m pip install -q "torch==2.13.0"
# The distribution was once called `nexus` (a name another PyPI package owns): drop that install of this
# checkout, so one distribution provides the `nexus` command and the job-type entry points.
if python -m pip show nexus 2>/dev/null | grep -qx "Editable project location: $PWD"; then
  python -m pip uninstall -q -y nexus
fi
python -m pip install -q -e ".[local,cpu,dev]"
