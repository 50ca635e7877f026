"""Layer 4: what a person looks at. The study report (report.py), figures (figures.py), video and
audio muxing (video.py, audiomux.py), colours (colors.py), the HTML viewer (viewer/). Imports render,
store, job, sd, core."""
