#!/usr/bin/env bash
# Everything the test suite needs on a fresh machine: torch (the local wheel), hpcwalk with its dev
# extra, and Debian's Chromium for the viewer's browser test (needs root for apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x /usr/bin/chromium ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e '.[dev]'
