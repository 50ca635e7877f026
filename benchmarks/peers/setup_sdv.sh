#!/usr/bin/env bash
# Make the virtual environment the stable-diffusion-videos peer runs in (benchmarks/peers/sdv_walk.py).
#
# stable-diffusion-videos 0.9.2 does not import on hpcwalk's stack (transformers 5 removed
# CLIPFeatureExtractor, torchvision 0.29 removed torchvision.io.write_video), so it gets its own venv:
# torch comes from the system (--system-site-packages), transformers<5 and diffusers<0.36 are
# installed into the venv, and a sitecustomize.py defines torchvision.io.write_video for the import
# only (the benchmark calls walk(make_video=False), so it is never called).
#
#   bash benchmarks/peers/setup_sdv.sh            # venv at $SDV_VENV (default ~/.cache/hpcwalk/sdv-venv)
#   $SDV_VENV/bin/python benchmarks/peers/sdv_walk.py --help
set -euo pipefail
VENV="${SDV_VENV:-$HOME/.cache/hpcwalk/sdv-venv}"
PY="${PYTHON:-python}"

# 1. the venv, seeing the system's torch
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
# 2. the peer and the versions it imports with
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  'stable-diffusion-videos==0.9.2' 'transformers<5' 'diffusers<0.36'
# 3. sitecustomize: torchvision.io.write_video for the import only
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cat > "$SITE/sitecustomize.py" <<'PY'
"""Defines torchvision.io.write_video (removed in torchvision 0.29) so stable_diffusion_videos imports."""
try:
    import torchvision.io as _tvio

    if not hasattr(_tvio, "write_video"):
        def write_video(*args, **kwargs):
            raise RuntimeError("write_video is a stub in the hpcwalk benchmark venv: call walk(make_video=False)")

        _tvio.write_video = write_video
except Exception:  # torchvision absent or broken: leave the import to fail loudly later
    pass
PY
# 4. prove it imports
"$VENV/bin/python" -c 'import stable_diffusion_videos, diffusers, transformers; print("sdv venv ok:", "diffusers", diffusers.__version__, "transformers", transformers.__version__)'
echo "$VENV/bin/python"
