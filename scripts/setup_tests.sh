#!/usr/bin/env bash
# Everything the test suite needs on a fresh machine: torch (the local wheel), hpcwalk with its dev
# extra, Debian's Chromium for the viewer's browser test, and Debian's SLURM and munge for the real-SLURM
# tests (tests/test_slurm_real.py starts its own cluster from them; apt-get and root needed, else skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x /usr/bin/chromium ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] \
   && ! { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e '.[dev]'
