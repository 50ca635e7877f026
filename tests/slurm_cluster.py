"""A real SLURM cluster on this machine for the tests: munged, slurmctld and one slurmd per node, all in
the foreground as subprocesses of the test session, with their own munge key, ports, state, spool and
logs in one folder, and a slurm.conf written there. Clients reach it through `cluster.env`
(SLURM_CONF); nothing under /etc is read or changed.

    cluster = SlurmCluster(root, nodes=2)   # root: an empty folder; nodes n1, n2
    cluster.start()                   # raises SlurmUnavailable (skip) or SlurmStartError (fail)
    job_id = cluster.sbatch([...], cwd=..., env=...)
    cluster.wait_done(job_id)         # the job's `scontrol show job` fields once it has ended
    cluster.stop()                    # scancel, then the daemons' process groups, then any leftover

Needs root (SlurmUser=root, slurmd starts jobs as their user) and Debian's slurmctld, slurmd,
slurm-client and munge packages (scripts/setup_tests.sh installs them). Finished jobs stay visible to
`scontrol show job` for an hour (MinJobAge), which is how a job's exit state is read without
accounting. Requeue is enabled (JobRequeue=1), and a requeued job may start again after about 5 s
(cred_expire; SLURM's default 120 s).

`python tests/slurm_cluster.py [ROOT [NODES]]` starts one (2 nodes by default) and keeps it up until Ctrl-C, printing the
SLURM_CONF to export, for trying things by hand.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
            "OUT_OF_MEMORY"}


class SlurmUnavailable(Exception):
    """This machine cannot run the test cluster (not root, or the packages are missing): a skip reason."""


class SlurmStartError(Exception):
    """The daemons did not come up; the message holds their logs."""


def unavailable_reason() -> str | None:
    """Why a test SLURM cluster cannot run here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "a test SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return "a test SLURM cluster needs root (SlurmUser=root; slurmd runs jobs as their submitter)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"SLURM/munge programs not found: {', '.join(missing)} (apt-get install slurmctld slurmd "
                "slurm-client munge; scripts/setup_tests.sh does it where apt-get and root are there)")
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _fields(text: str) -> dict[str, str]:
    """`scontrol show job -o` (one line of Key=Value pairs) as a dict; values never hold spaces but Command's
    and WorkDir's may, so keys are split at ' Key=' boundaries."""
    out: dict[str, str] = {}
    key = None
    for tok in text.strip().split(" "):
        k, eq, v = tok.partition("=")
        if eq and k and k[0].isupper():
            key = k
            out[key] = v
        elif key is not None:
            out[key] += " " + tok
    return out


class SlurmCluster:
    """A one-host SLURM cluster of `nodes` nodes n1, n2, ..., one slurmd each (slurmd -N NAME, all with
    NodeHostname=this host, NodeAddr=127.0.0.1 and a port of their own), `cpus` CPUs each."""

    def __init__(self, root: str | os.PathLike, nodes: int = 1, cpus: int = 2):
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.host = platform.node().split(".")[0]
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "HPCWALK_TEST_SLURM": str(self.root)}
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))]:
            if k != "SLURM_CONF":
                del self.env[k]

    # -- start and stop ------------------------------------------------------------------------

    def write_conf(self) -> None:
        ctld_port, *slurmd_ports = _free_ports(1 + len(self.nodes))
        first_job = random.randrange(100_000, 900_000)  # /tmp/hpcwalk-ray-$SLURM_JOB_ID differs between sessions
        d = self.root
        lines = [
            "ClusterName=hpcwalktest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket},cred_expire=5",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/slurmctld.log",
            f"SlurmdLogFile={d}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=2",  # a requeued job starts once eligible, not up to 60 s later
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=2",
            "MinJobAge=3600",
            "JobRequeue=1",
            f"FirstJobId={first_job}",
            "SlurmdTimeout=300",
            *(f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} State=UNKNOWN"
              for n, port in zip(self.nodes, slurmd_ports)),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, wait_s: float = 120.0) -> None:
        why = unavailable_reason()
        if why:
            raise SlurmUnavailable(why)
        for sub in ("munge", "state", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.write_conf()
        m = self.root / "munge"
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={self.socket}", f"--key-file={key}",
                               f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"])
        self._wait(lambda: self.socket.exists(), 30, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait(lambda: self._run(["scontrol", "ping"]).returncode == 0, wait_s, "slurmctld did not answer `scontrol ping`")
        for n in self.nodes:  # one slurmd per node name, all on this host (-N: Debian's slurmd has multiple-slurmd support)
            self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf)])
        self._wait(self._nodes_idle, wait_s, f"nodes {','.join(self.nodes)} did not all become idle in `sinfo`")

    def stop(self) -> list[str]:
        """Cancel every job, stop the daemons (SIGTERM to each process group, SIGKILL after 15 s), then kill any
        process still carrying this cluster's marker in its environment (a job's step, slurmstepd). Returns the
        leftovers that had to be killed, for the caller to report."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self._run(["scancel", "--full", "--user=root"])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self._run(["squeue", "-h", "-o", "%i"]).stdout.strip():
                time.sleep(0.5)
        for name in [*(f"slurmd-{n}" for n in self.nodes), "slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is None:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(15)
        leftovers = self.processes()
        for pid, cmd in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.procs.clear()
        return [f"{pid} {cmd}" for pid, cmd in leftovers]

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every process started for this cluster (its marker in the environment)."""
        marker = f"HPCWALK_TEST_SLURM={self.root}".encode()
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
                    found.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")))
            except OSError:
                continue
        return found

    def logs(self, tail: int = 40) -> str:
        out = []
        for f in (self.root / "munge" / "munged.log", self.root / "slurmctld.log", *sorted(self.root.glob("slurmd-*.log")),
                  *sorted(self.root.glob("*.stderr"))):
            if f.exists():
                lines = f.read_text(errors="replace").splitlines()[-tail:]
                out.append(f"--- {f.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(out) or "(no daemon logs)"

    # -- the clients -----------------------------------------------------------------------------

    def sbatch(self, args: list[str], cwd: str | os.PathLike, env: dict[str, str] | None = None) -> str:
        """Submit; the job id. `env` (default self.env) is what the job sees: sbatch passes it on (--export=ALL)."""
        p = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or self.env, capture_output=True,
                           text=True, timeout=60)
        if p.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}\n{self.logs()}")
        return p.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The job's `scontrol show job` fields ({} once SLURM has forgotten it)."""
        p = self._run(["scontrol", "show", "job", "-o", job_id])
        return _fields(p.stdout) if p.returncode == 0 else {}

    def wait_done(self, job_id: str, timeout_s: float = 300.0, poll_s: float = 0.5) -> dict[str, str]:
        """Wait until the job has ended (not pending, running, completing or requeued); its fields then."""
        return self.wait_state(job_id, FINISHED, timeout_s, poll_s)

    def wait_state(self, job_id: str, states: set[str], timeout_s: float = 120.0, poll_s: float = 0.2) -> dict[str, str]:
        """Wait until the job's JobState is one of `states`; its fields then (AssertionError with the logs after
        `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll_s)
        raise AssertionError(f"job {job_id} not in {sorted(states)} within {timeout_s:.0f} s: {info}\n{self.logs()}")

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        p = self._run(["scontrol", *args])
        if p.returncode != 0:
            raise AssertionError(f"scontrol {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
        return p

    # -- internals -------------------------------------------------------------------------------

    def _run(self, cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.root / f"{name}.stderr", "wb") as err:
            self.procs[name] = subprocess.Popen(cmd, env=self.env, cwd=self.root, stdin=subprocess.DEVNULL,
                                                stdout=err, stderr=subprocess.STDOUT, start_new_session=True,
                                                preexec_fn=_die_with_parent)

    def _nodes_idle(self) -> bool:
        p = self._run(["sinfo", "-h", "-N", "-o", "%N %t"])
        states = dict(ln.split() for ln in p.stdout.splitlines() if len(ln.split()) == 2)
        return sorted(states) == sorted(self.nodes) and all(s == "idle" for s in states.values())

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmStartError(f"{what}: {', '.join(dead)} exited "
                                      f"({', '.join(str(self.procs[n].returncode) for n in dead)})\n{self.logs()}")
            time.sleep(0.3)
        raise SlurmStartError(f"{what} within {timeout_s:.0f} s\n{self.logs()}")



def _die_with_parent() -> None:
    """In the daemon's child before exec: SIGTERM when the test process dies (even by SIGKILL), so a killed
    test session leaves no daemons running."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops the cluster like Ctrl-C
    import tempfile

    root = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="hpcwalk-slurm-")
    c = SlurmCluster(root, nodes=int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    try:
        c.start()
        print(f"export SLURM_CONF={c.conf}   # Ctrl-C stops the cluster", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopped; left over:", c.stop())
