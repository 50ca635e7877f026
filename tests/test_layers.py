"""The package's shape (docs/architecture.md): no import circle between hpcwalk modules, counting
function-local and TYPE_CHECKING imports; the import-linter layers contract in pyproject.toml, with
no ignored import; only the package face, cli and study at the top of hpcwalk/; modules kept short;
and nothing in the checkout that shadows a PyPI package when Python starts in the repository root."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "hpcwalk"
MAX_LINES = 400
TOP_LEVEL = {"__init__.py", "__main__.py", "cli.py", "study.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the hpcwalk modules it imports anywhere in its file (function bodies, TYPE_CHECKING too)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    graph[name].add(t)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_circle_finder_finds_a_planted_circle():
    """The finder itself: a function-local import closing a loop is a circle."""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(g) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_hpcwalk_modules():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 150  # the graph was really read
    assert circles(graph) == []


def test_layers_contract_passes_with_no_ignored_imports():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = cfg["contracts"]
    assert contract["type"] == "layers" and contract.get("exhaustive") is True
    assert "ignore_imports" not in contract and "unmatched_ignore_imports_alerting" not in contract
    lint = Path(sys.executable).with_name("lint-imports")
    cmd = [str(lint)] if lint.exists() else ["lint-imports"]
    r = subprocess.run([*cmd, "pyproject.toml", "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def test_only_the_face_cli_and_study_sit_at_the_top_of_the_package():
    top = {p.name for p in PKG.glob("*.py")}
    assert top <= TOP_LEVEL, sorted(top - TOP_LEVEL)
    layers = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert layers == {"core", "sd", "job", "render", "store", "run", "analyse", "see", "bench", "kernels", "cli"}


def test_modules_are_short_or_say_why():
    """Over MAX_LINES lines, a module's docstring must say why it is one file ("one file because")."""
    long = []
    for p in PKG.rglob("*.py"):
        n = len(p.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(p.read_text())) or ""
        if n > MAX_LINES and "one file because" not in doc:
            long.append(f"{p.relative_to(ROOT)}: {n} lines")
    assert not long, long


def test_nothing_in_the_checkout_shadows_an_installed_package_from_the_repository_root():
    """`python -m ...` in the repository root puts it first on sys.path: a top-level folder there with an
    __init__.py named like a PyPI package (transformers and diffusers import `kernels`) would win."""
    site = {p.name for d in map(Path, sys.path) if d.is_dir() and d.resolve() != ROOT for p in d.iterdir()}
    shadows = [p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name != "hpcwalk" and p.name in site]
    assert shadows == []
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and not r.stdout.strip().startswith(str(ROOT / "kernels")), r.stdout


def test_fingerprints_of_the_examples_are_those_before_the_layout():
    """Run folders rendered before the package was split into layers resume after it: the examples'
    fingerprints are the values the flat package (hpcwalk/job.py, commit 5e7523b) computed."""
    from hpcwalk.job import load_job
    from hpcwalk.job.studyspec import load_study

    ex = ROOT / "examples"
    assert load_job(ex / "quickstart.toml").fingerprint() == "a4572b5c91de97b5"
    assert load_job(ex / "cat.toml").fingerprint() == "57419bd105a2fa3e"
    # walks.toml paces a walk by an audio file: its fingerprint was 3c977b471badea77 on one machine and
    # 48655be1b1f758d5 on another (the gammas placed from the audio differ in the last bits between PyAV
    # builds); the audio's sha256 and the audio_* keys now stand for the gammas, so it is one value everywhere
    assert load_job(ex / "walks.toml").fingerprint() == "32d1a62decacc556"
    assert load_study(ex / "study.toml").job.fingerprint() == "f00a6932ccbfc373"


def test_an_audio_paced_job_has_one_fingerprint_on_every_machine():
    """Gammas placed from an audio file differ in the last bit between decoders and CPUs: the fingerprint
    does not see them, but sees every key they are computed from."""
    import dataclasses

    import numpy as np

    from hpcwalk.job import load_job

    job = load_job(ROOT / "examples" / "walks.toml")
    i, w = next((i, w) for i, w in enumerate(job.walks) if w.audio_sha256)
    assert w.audio_gammas

    def with_walk(**kw):
        walks = list(job.walks)
        walks[i] = dataclasses.replace(w, **kw)
        return dataclasses.replace(job, walks=tuple(walks))

    ulp = tuple(float(np.nextafter(g, 2.0)) for g in w.audio_gammas)
    assert with_walk(audio_gammas=ulp).fingerprint() == job.fingerprint()
    for key, value in (("audio_floor", 0.3), ("audio_fps", 10.0), ("audio_start", 0.5), ("audio_sha256", "0" * 64)):
        assert with_walk(**{key: value}).fingerprint() != job.fingerprint(), key


def test_the_stable_import_paths_still_work():
    """The paths users' scripts import (documented as stable in docs/architecture.md)."""
    import hpcwalk.job
    import hpcwalk.store
    from hpcwalk.job.parse import load_job
    from hpcwalk.store.reader import read_frames

    assert hpcwalk.store.read_frames is read_frames and hpcwalk.job.load_job is load_job
    assert callable(hpcwalk.store.read_verified) and callable(hpcwalk.store.verify_run)
    assert callable(hpcwalk.job.plan) and callable(hpcwalk.job.shard) and hpcwalk.job.RenderJob
