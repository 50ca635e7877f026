"""Layer 2: a job, from its TOML file to the shards it is cut into; no model, no device, no files
but the job's own inputs.

  bounds.py     every numeric and text limit, checked while parsing
  spec.py       the frozen dataclasses (RenderJob, Walk, FrameRow, Shard) and the fingerprint
  parse.py      TOML -> RenderJob (tables, walks)        walkkeys.py  the per-kind walk keys
  plan.py       RenderJob -> FramePlan -> [Shard] (placement, keyframes, segments)
  pacing.py     easing, even pacing and audio pacing math  imagefile.py  image inputs of a walk
  audiofile.py  audio inputs: decoding and onset strength, streamed in bounded memory
  studyspec.py  the [study] table -> Study

Stable import paths (documented for users): `hpcwalk.job.load_job`, `hpcwalk.job.parse_job`,
`hpcwalk.job.plan`, `hpcwalk.job.shard`, `hpcwalk.job.RenderJob`, `hpcwalk.job.JobError`.
"""

from hpcwalk.core.errors import JobError
from hpcwalk.job.parse import load_job, parse_job
from hpcwalk.job.plan import plan, shard
from hpcwalk.job.spec import RenderJob

__all__ = ["JobError", "RenderJob", "load_job", "parse_job", "plan", "shard"]
