#!/usr/bin/env bash
# Install Nexus with everything the local cluster and the tests need (CPU only; no Docker, no GPU).
# torch first, pinned, so pip takes the local CPU wheel instead of several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[local,cpu,dev]"
