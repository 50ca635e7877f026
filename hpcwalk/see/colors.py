"""One method-to-colour table for every picture hpcwalk draws: the study report, the figures and the viewer
(passed to the page in data.js). Methods without an entry (a mix layout, a walk kind) take the palette in
order of appearance."""

from __future__ import annotations

METHOD_COLORS: dict[str, str] = {"linear": "#d62728", "normalized": "#1f77b4", "slerp": "#2ca02c"}
PALETTE = ("#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
# Text that comes from data (prompts, walk and model names) is drawn as written by matplotlib: never
# mathtext ($...$) nor LaTeX, whatever the user's matplotlibrc says (report.py, figures.py).
DATA_TEXT = {"parse_math": False, "usetex": False}


def color(method: str, position: int = 0) -> str:
    """The colour of a method; others cycle through PALETTE by their position among the uncoloured ones."""
    return METHOD_COLORS.get(method, PALETTE[position % len(PALETTE)])
