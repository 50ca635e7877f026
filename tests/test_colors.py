"""One method-to-colour table: the study report's curves, the figures' paths and the viewer's data use the
same colour for each method (normalized and slerp had each other's in the report). The figures module draws
with hpcwalk.see.colors.color; the report's curve colours and the viewer's data.js are read back here."""

from __future__ import annotations

import json

from matplotlib.colors import to_hex

from hpcwalk.see.colors import METHOD_COLORS
from hpcwalk.see.figures import trajectory_figure
from hpcwalk.see.report import fig_score_curves
from hpcwalk.store.runindex import open_run
from hpcwalk.see.viewer.build import build_viewer
from synthetic_run import LATENT3, make_run


def test_report_figures_and_viewer_share_each_methods_colour(tmp_path):
    curves = {m: {"x": [0, 1], "mean": [1, 2], "low": [0, 1], "high": [2, 3]} for m in ("linear", "normalized", "slerp")}
    fig = fig_score_curves({"score_curves": {"clip": curves}, "clip_models": {"clip": "m"}})
    report = {line.get_label(): to_hex(line.get_color()) for line in fig.axes[0].get_lines()}
    traj = trajectory_figure(str(tmp_path / "t.png"), n=5)
    assert set(traj.paths) == set(report)
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=3)], clip=True)
    build_viewer(open_run(run))
    data = json.loads((tmp_path / "run" / "viewer" / "data.js").read_text().removeprefix("window.HPCWALK = ")
                      .rstrip().rstrip(";"))
    assert report == data["colors"] == METHOD_COLORS
    assert report["normalized"] != report["slerp"]
