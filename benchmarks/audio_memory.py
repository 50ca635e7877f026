"""Peak memory and seconds of analysing audio: `audio_onsets(WAV)` (PyAV decode + onset strength) in a fresh process.

    python benchmarks/audio_memory.py [--minutes 180] [--kinds silence,noise] [--dir /tmp] [--out results/X.json] [--note TEXT]

Writes a mono 16-bit 22.05 kHz WAV per kind (the longest file a job accepts by default: 3 hours, about
476 MB each; `silence` is digital zeros, `noise` Gaussian noise at a new level between -41 and -21 dBFS RMS
every second, so there are onsets throughout) with the stdlib `wave` module a minute at a time, then
runs `hpcwalk.job.audiofile.audio_onsets` on it in its own Python process and reports that process's
peak RSS two ways: `ru_maxrss` (resource.getrusage; on Linux it is carried over exec, so it would
include a large parent's peak: this script's parent stays small) and `VmHWM` from /proc/self/status
(the program's own), the RSS right before the analysis, and the analysis's wall seconds. The WAVs are
deleted afterwards. The whole-signal code this replaced needed 7.1 GiB for one array at 3 hours
(MemoryError on a 24 GiB machine) and 1.14 GiB VmHWM on 10 minutes of noise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

RATE = 22_050
CHILD = r"""
import json, resource, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM:", "VmRSS:")):
            yield line.split()[0][:-1], int(line.split()[1]) / 1024
before = dict(hwm())
from hpcwalk.job.audiofile import audio_onsets
t0 = time.perf_counter()
o = audio_onsets(sys.argv[1])
seconds = time.perf_counter() - t0
print(json.dumps({"analyse_s": seconds, "duration_s": o.duration_s, "hops": int(o.strength.size),
                  "mean_onset": float(o.strength.mean()), "rss_before_mib": before["VmRSS"],
                  "peak_vmhwm_mib": dict(hwm())["VmHWM"],
                  "peak_ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_wav(path: Path, kind: str, minutes: float) -> None:
    rng = np.random.default_rng(0)
    left = int(minutes * 60 * RATE)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        while left:
            n = min(left, 60 * RATE)
            left -= n
            if kind == "silence":
                y = np.zeros(n, np.int16)
            else:
                level = np.repeat(10 ** (rng.uniform(-2, 0, -(-n // RATE)) / 2), RATE)[:n]  # a step every second
                y = (rng.standard_normal(n) * level * 2900).clip(-32767, 32767).astype(np.int16)
            w.writeframes(y.astype("<i2").tobytes())


def measure(path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    root = Path(__file__).resolve().parents[1]  # this checkout's hpcwalk first
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env,
                         cwd=root, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=180.0)
    p.add_argument("--kinds", default="silence,noise")
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--out", default="")
    p.add_argument("--note", default="", help="the machine in words, written to the JSON")
    args = p.parse_args()
    rows = []
    for kind in args.kinds.split(","):
        path = Path(args.dir) / f"hpcwalk-audio-memory-{kind}-{os.getpid()}.wav"
        try:
            t0 = time.perf_counter()
            write_wav(path, kind, args.minutes)
            row = {"kind": kind, "minutes": args.minutes, "wav_bytes": path.stat().st_size,
                   "write_s": time.perf_counter() - t0, **measure(path)}
        finally:
            path.unlink(missing_ok=True)
        rows.append(row)
        print(f"{kind:>8} {args.minutes:g} min ({row['wav_bytes'] / 1e6:.0f} MB WAV): peak RSS {row['peak_vmhwm_mib']:.0f} MiB "
              f"(VmHWM; ru_maxrss {row['peak_ru_maxrss_mib']:.0f} MiB, {row['rss_before_mib']:.0f} before import), "
              f"decode + onsets {row['analyse_s']:.1f} s", flush=True)
    if args.out:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
        Path(args.out).write_text(json.dumps({"host": os.uname().nodename, "note": args.note, "cpu": cpu,
                                              "cpus": os.cpu_count(),
                                              "load_avg": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M"),
                                              "python": sys.version.split()[0], "numpy": np.__version__,
                                              "av": __import__("av").__version__, "cases": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
