"""Layer 4: running a render. The checks made before any work and the plan they end in
(preflight.py), the shard loop every executor shares (base.py), the local executor (local.py) and
the Ray one (ray.py), inverted endpoints of image walks (endpoints.py), even pacing's coarse pass
(evenpace.py). Imports render, store, job, sd, core."""
