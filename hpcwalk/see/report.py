"""The study report: matplotlib figures (PNG files and base64 in report.html) and result tables.

Reads only the study summary (study.json's dict) and the per-walk table (study.parquet).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hpcwalk.see.colors import DATA_TEXT
from hpcwalk.see.colors import color as _color


def _figure(ncols: int, figsize: tuple[float, float]):
    """A pyplot-free Figure (no global backend state) and its (1, ncols) axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols, squeeze=False)


# ---------------------------------------------------------------------------------------------
# 1. Figures (each returns a matplotlib Figure)
# ---------------------------------------------------------------------------------------------


def fig_interp_score(summary: dict[str, Any], walks: pa.Table):
    """Mean InterpScore per method with its CI, over the per-pair values, one panel per CLIP model."""
    prefixes = list(summary["interp_score"])
    fig, axes = _figure(len(prefixes), (4.5 * len(prefixes), 3.6))
    rng = np.random.default_rng(0)
    for ax, p in zip(axes[0], prefixes):
        col = "interp_score" if p == "clip" else f"interp_score_{p}"
        for i, (m, iv) in enumerate(summary["interp_score"][p].items()):
            vals = np.asarray([r[col] for r in walks.to_pylist() if r["method"] == m])
            ax.scatter(i + rng.uniform(-0.15, 0.15, vals.size), vals, s=8, alpha=0.35, color=_color(m))
            ax.errorbar(i, iv["estimate"], yerr=[[iv["estimate"] - iv["low"]], [iv["high"] - iv["estimate"]]],
                        fmt="o", color="black", capsize=6, ms=6)
        ax.set_xticks(range(len(summary["interp_score"][p])), list(summary["interp_score"][p]))
        ax.set_ylabel("InterpScore")
        ax.set_title(f"{summary['clip_models'].get(p, p)}", fontsize=9, **DATA_TEXT)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def fig_paired(summary: dict[str, Any]):
    """Paired differences between methods (same seed pairs) with CIs; zero = no difference."""
    prefixes = list(summary["paired_differences"])
    n = max(len(v) for v in summary["paired_differences"].values())
    fig, axes = _figure(len(prefixes), (4.5 * len(prefixes), 0.6 * n + 1.6))
    for ax, p in zip(axes[0], prefixes):
        items = list(summary["paired_differences"][p].items())
        for i, (name, iv) in enumerate(items):
            color = "black" if iv["low"] <= 0 <= iv["high"] else "#d62728"
            ax.errorbar(iv["estimate"], i, xerr=[[iv["estimate"] - iv["low"]], [iv["high"] - iv["estimate"]]],
                        fmt="o", color=color, capsize=5)
        ax.axvline(0, color="gray", lw=1, ls="--")
        ax.set_yticks(range(len(items)), [k for k, _ in items])
        ax.set_xlabel("difference in InterpScore")
        ax.set_title(f"{summary['clip_models'].get(p, p)}", fontsize=9, **DATA_TEXT)
        ax.invert_yaxis()
    fig.tight_layout()
    return fig


def _curve_panel(ax, curves: dict[str, Any], ylabel: str, xlabel: str = "gamma") -> None:
    for m, c in curves.items():
        x = np.asarray(c["x"])
        ax.plot(x, c["mean"], color=_color(m), label=m, lw=1.6)
        ax.fill_between(x, c["low"], c["high"], color=_color(m), alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def fig_score_curves(summary: dict[str, Any]):
    """CLIPScore versus gamma per method, mean over seed pairs with a pointwise band."""
    prefixes = list(summary["score_curves"])
    fig, axes = _figure(len(prefixes), (5 * len(prefixes), 3.6))
    for ax, p in zip(axes[0], prefixes):
        _curve_panel(ax, summary["score_curves"][p], "CLIPScore")
        ax.set_title(f"{summary['clip_models'].get(p, p)}", fontsize=9, **DATA_TEXT)
    fig.tight_layout()
    return fig


def fig_latent_norm(summary: dict[str, Any]):
    """||z|| / sqrt(dim) versus gamma per method, with the expected linear dip sqrt((1-g)^2 + g^2)."""
    fig, axes = _figure(1, (5.5, 3.6))
    ax = axes[0][0]
    _curve_panel(ax, summary["latent_norm_curves"], "||z_T|| / sqrt(dim)")
    th = summary["latent_norm_linear_theory"]
    start = np.mean([c["mean"][0] for c in summary["latent_norm_curves"].values()])
    ax.plot(th["gamma"], np.asarray(th["ratio"]) * start, color="black", ls=":", lw=1.2,
            label="linear, expected: sqrt((1-g)^2+g^2)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_smoothness(summary: dict[str, Any]):
    """Step sizes along the walk (cosine distance between consecutive frames) and their spread."""
    p = next(iter(summary["step_curves"]))
    fig, axes = _figure(4, (14, 3.4))
    _curve_panel(axes[0][0], summary["step_curves"][p], "1 - cos(frame i, frame i+1)")
    axes[0][0].set_title(f"step size along the walk ({summary['clip_models'].get(p, p)})", fontsize=9, **DATA_TEXT)
    sm = summary["smoothness"][p]
    for ax, (key, label) in zip(axes[0][1:], (("path_length", "path length (sum of steps)"),
                                              ("max_step", "largest step"), ("step_cv", "step CV = std / mean"))):
        for i, (m, per) in enumerate(sm.items()):
            iv = per[key]
            ax.bar(i, iv["estimate"], 0.6, color=_color(m),
                   yerr=[[iv["estimate"] - iv["low"]], [iv["high"] - iv["estimate"]]], capsize=4)
        ax.set_xticks(range(len(sm)), list(sm))
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    fig.tight_layout()
    return fig


def fig_yardsticks(summary: dict[str, Any]):
    """The yardsticks that are not CLIP along the walk: sharpness, SSIM and LPIPS steps, KID per gamma bin."""
    panels = [(k, lab) for k, lab in (("sharpness_curves", "sharpness (var. of Laplacian)"),
                                      ("ssim_step_curves", "pixel step 1 - SSIM"),
                                      ("lpips_step_curves", "LPIPS step")) if k in summary]
    kid = summary.get("kid", {})
    fig, axes = _figure(max(1, len(panels) + len(kid)), (4.2 * max(1, len(panels) + len(kid)), 3.4))
    for ax, (key, label) in zip(axes[0], panels):
        _curve_panel(ax, summary[key], label)
        ax.set_title(label, fontsize=9)
    for ax, (prefix, k) in zip(axes[0][len(panels):], kid.items()):
        x = [np.mean(b) for b in k["bins"]]
        for j, (m, ivs) in enumerate(k["per_bin"].items()):
            est = np.array([iv["estimate"] for iv in ivs])
            err = [est - [iv["low"] for iv in ivs], [iv["high"] for iv in ivs] - est]
            ax.errorbar(np.array(x) + (j - 1) * 0.012, est, yerr=np.nan_to_num(err), fmt="o-", ms=4, capsize=3,
                        color=_color(m), label=m)
        ax.axhline(0, color="gray", lw=1, ls="--")
        ax.set_xlabel("gamma bin (centre)")
        ax.set_ylabel("KID vs endpoint frames")
        ax.set_title(f"KID per gamma bin ({k['label']})", fontsize=9, **DATA_TEXT)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# name -> (figure function, needs the walk table, caption)
FIGURES = {
    "interp_score": (fig_interp_score, True, "InterpScore per method: mean over seed pairs with its {pct} "
                     "bootstrap interval (black); dots are single walks."),
    "paired_differences": (fig_paired, False, "Paired differences of InterpScore between methods over the same "
                           "seed pairs, {pct} interval; red where the interval excludes 0."),
    "score_vs_gamma": (fig_score_curves, False, "CLIPScore along the walk: mean over seed pairs with a pointwise "
                       "{pct} band."),
    "latent_norm": (fig_latent_norm, False, "Latent norm ||z_T|| / sqrt(dim) along the walk: linear interpolation "
                    "of independent Gaussians shrinks it to 1/sqrt(2) at gamma = 0.5 (dotted: expected); "
                    "normalized and slerp keep it."),
    "smoothness": (fig_smoothness, False, "Smoothness: cosine distance between consecutive frames' CLIP embeddings "
                   "along the walk; per walk its sum, its largest step, and its spread (CV: 0 = even pace)."),
    "yardsticks": (fig_yardsticks, False, "Yardsticks that are not CLIP, mean over seed pairs with a pointwise {pct} "
                   "band: sharpness of each frame (variance of the Laplacian of the luma: blur lowers it), the pixel "
                   "(1 - SSIM) and LPIPS steps between consecutive frames, and KID of each gamma bin's interior frames "
                   "against every pair's endpoint frames (0 = on the distribution of ordinary samples), with {pct} "
                   "intervals over pairs."),
}


def _pct(summary: dict[str, Any]) -> str:
    return f"{100 * summary['study']['confidence']:g}%"


# ---------------------------------------------------------------------------------------------
# 2. The HTML page
# ---------------------------------------------------------------------------------------------


def _fmt(iv: dict[str, float], digits: int = 3) -> str:
    """estimate [low, high] to `digits` significant digits."""
    return f"{iv['estimate']:#.{digits}g} <span class=ci>[{iv['low']:#.{digits}g}, {iv['high']:#.{digits}g}]</span>"


def _tables(summary: dict[str, Any]) -> str:
    parts = []
    for p, per in summary["interp_score"].items():
        sm = summary["smoothness"][p]
        head = "<tr><th>method</th><th>InterpScore</th><th>path length</th><th>largest step</th><th>step CV</th>"
        head += "<th>min latent norm</th></tr>" if p == "clip" else "</tr>"
        body = ""
        for m, iv in per.items():
            body += (f"<tr><td>{html.escape(m)}</td><td>{_fmt(iv)}</td><td>{_fmt(sm[m]['path_length'])}</td>"
                     f"<td>{_fmt(sm[m]['max_step'])}</td><td>{_fmt(sm[m]['step_cv'])}</td>")
            body += f"<td>{_fmt(summary['latent_norm'][m]['min'])}</td></tr>" if p == "clip" else "</tr>"
        diffs = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(iv)}</td><td>{'no' if iv['low'] <= 0 <= iv['high'] else 'yes'}</td></tr>"
                        for k, iv in summary["paired_differences"][p].items())
        parts.append(f"<h3>CLIP {html.escape(summary['clip_models'].get(p, p))} (columns {p}_*)</h3>"
                     f"<table>{head}{body}</table>"
                     f"<h4>Paired differences (same seed pairs)</h4><table><tr><th>difference</th><th>mean [CI]</th>"
                     f"<th>CI excludes 0</th></tr>{diffs}</table>")
    return "".join(parts)


def _yardstick_table(summary: dict[str, Any]) -> str:
    """One row per yardstick: ranking, each method's value [CI], the comparisons Holm leaves resolved, agreement."""
    ys = summary.get("yardsticks", {})
    if not ys:
        return ""
    methods = summary["study"]["methods"]
    head = ("<tr><th>yardstick</th><th>better</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in methods)
            + "<th>ranking (best first)</th><th>resolved after Holm</th><th>agrees with CLIP (Kendall's tau)</th></tr>")
    body = ""
    for name, y in ys.items():
        cells = "".join(f"<td>{_fmt(y['per_method'][m])}</td>" for m in methods)
        resolved = ", ".join(f"{html.escape(k)} (p<sub>Holm</sub> {t['p_holm']:.3g})"
                             for k, t in y["paired"].items() if t["resolved"]) or "none"
        ag = y.get("agreement")
        agree = "&mdash;" if not ag else (
            f"{html.escape(ag['verdict'])}: {ag['estimate']:.2f} <span class=ci>[{ag['low']:.2f}, {ag['high']:.2f}]</span>"
            if np.isfinite(ag["estimate"]) else "undefined (ties)")
        body += (f"<tr data-yardstick='{html.escape(name)}'><td>{html.escape(y['label'])}</td><td>{y['better']}</td>"
                 f"{cells}<td>{' &gt; '.join(map(html.escape, y['ranking']))}</td><td>{resolved}</td><td>{agree}</td></tr>")
    kid = ""
    for prefix, k in summary.get("kid", {}).items():
        bins = "".join(f"<th>&gamma; {b[0]:.3g}" + (f"&ndash;{b[1]:.3g}" if b[1] > b[0] else "") + "</th>"
                       for b in k["bins"])
        rows = "".join(f"<tr><td>{html.escape(m)}</td>" + "".join(f"<td>{_fmt(iv)}</td>" for iv in ivs) + "</tr>"
                       for m, ivs in k["per_bin"].items())
        kid += (f"<h4>KID per gamma bin, {html.escape(k['label'])} features (interior frames vs endpoint frames)</h4>"
                f"<table class=yardsticks><tr><th>method</th>{bins}</tr>{rows}</table>")
    return f"<h3>Every yardstick</h3><table class=yardsticks>{head}{body}</table>{kid}"


def _warnings_html(summary: dict[str, Any]) -> str:
    items = summary.get("warnings", [])
    if not items:
        return ""
    return ("<div id=warnings class=warn role=alert><strong>Read with care</strong><ul>"
            + "".join(f"<li>{html.escape(w)}</li>" for w in items) + "</ul></div>")


def _left_out(summary: dict[str, Any]) -> str:
    n = summary.get("pairs_left_out", 0)
    if not n:
        return ""
    return (f"<p><strong>{summary['n_units']} of {summary['study']['pairs']} seed pairs analysed:</strong> {n} left "
            "out because some walk of theirs was incomplete (not rendered, or a damaged shard); rerun the study to "
            "render them.</p>\n")


def render_html(summary: dict[str, Any], figures: dict[str, bytes]) -> str:
    """A self-contained page: settings, tables, figures as base64 PNG."""
    st = summary["study"]
    scoring = st.get("score_prompts") or st["prompts"]
    prompts = "".join(f"<li>{html.escape(p)} &rarr; {html.escape(q)}</li>" for p, q in zip(st["prompts"], scoring))
    imgs = "".join(f"<figure><img alt='{k}' src='data:image/png;base64,{base64.b64encode(v).decode()}'>"
                   f"<figcaption>{html.escape(FIGURES[k][2].format(pct=_pct(summary)))} (figures/{k}.png)"
                   "</figcaption></figure>" for k, v in figures.items())
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>hpcwalk study</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: .3em .7em; text-align: right; white-space: nowrap; }}
th:first-child, td:first-child {{ text-align: left; }}
.ci {{ color: #777; font-size: .9em; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: .9em; max-width: 900px; }}
#answer {{ font-size: 1.05em; line-height: 1.45; }}
.warn {{ background: #fff4e5; border: 1px solid #f0a040; padding: .5em 1em; margin: 1em 0; }}
table.yardsticks td, table.yardsticks th {{ white-space: normal; font-size: .9em; }}
</style></head><body>
<h1>InterpScore study</h1>
<p id=answer>{html.escape(summary.get('answer', ''))}</p>
{_warnings_html(summary)}
<p>{st['pairs']} seed pairs &times; {len(st['methods'])} methods ({', '.join(st['methods'])}) &times;
{st['frames']} frames; prompts (generation &rarr; scoring):</p><ul>{prompts}</ul>
{_left_out(summary)}<p>Model {html.escape(summary['model'])}, {summary['steps']} steps, {summary['size'][0]}&times;{summary['size'][1]};
seed pair i interpolates seed first_seed + i ({st['first_seed']} + i), draw 0 to draw 1.
Intervals: {100 * st['confidence']:g}% percentile bootstrap ({st['bootstrap']} resamples) over
{html.escape(summary['unit'])}. Job fingerprint {summary['job_fingerprint']}.</p>
<h2>Results</h2>{_yardstick_table(summary)}{_tables(summary)}
<h2>Figures</h2>{imgs}
</body></html>
"""


def write_report(out: str, summary: dict[str, Any], walks: pa.Table) -> list[str]:
    """figures/*.png and report.html in `out`; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    from hpcwalk.core.fsio import filesystem, write_atomic

    root = Path(out)
    (root / "figures").mkdir(parents=True, exist_ok=True)
    fs, where = filesystem(out)
    pngs: dict[str, bytes] = {}
    for name, (fn, needs_walks, _) in FIGURES.items():
        fig = fn(summary, walks) if needs_walks else fn(summary)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        pngs[name] = buf.getvalue()
        write_atomic(fs, f"{where}/figures/{name}.png", pngs[name])  # temporary name; none left when it fails
    write_atomic(fs, f"{where}/report.html", render_html(summary, pngs).encode("utf-8"))
    return [str(root / "report.html")] + [str(root / "figures" / f"{k}.png") for k in pngs]
