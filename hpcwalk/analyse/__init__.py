"""Layer 4: reading measures back. InterpScore and the per-walk tables (interpscore.py), the
yardstick tables (yardsticks.py), pixel-space steps (pixelsteps.py), re-scoring a run against new
prompts (score.py). Imports render, store, job, sd, core."""
