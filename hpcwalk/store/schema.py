"""the Parquet schema and run metadata"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa

import hpcwalk
from hpcwalk.job.spec import FrameRow, RenderJob

# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------

PROVENANCE_FIELDS = [
    pa.field("frame_id", pa.string(), nullable=False),
    pa.field("walk", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("index", pa.int32(), nullable=False),
    pa.field("segment", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("draw", pa.int32(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("seed_b", pa.int64()),
    pa.field("draw_b", pa.int32()),
    pa.field("prompt_b", pa.string()),
    pa.field("gamma", pa.float64()),
    pa.field("t", pa.int32()),
    pa.field("std", pa.float64()),
    pa.field("score_prompt", pa.string(), nullable=False),  # the text clip_score is scored against
    pa.field("score_prompt_b", pa.string()),  # text walks: the text clip_score_b is scored against
    pa.field("position", pa.float64()),  # the uniform place along the segment before easing or pacing
    pa.field("easing", pa.string(), nullable=False),
    pa.field("easing_exponent", pa.float64()),
    pa.field("pace", pa.string(), nullable=False),
    pa.field("pace_pass", pa.string(), nullable=False),  # even pacing: coarse | final
    pa.field("reused_from", pa.string()),  # even pacing: the coarse frame id this frame copies
    pa.field("time_s", pa.float64()),  # audio pacing: when the frame shows
    pa.field("text_method", pa.string()),  # keyframes walks
    pa.field("image_path", pa.string()),  # images walks: the segment's endpoint files as written in the job
    pa.field("image_path_b", pa.string()),
    pa.field("image_sha256", pa.string()),
    pa.field("image_sha256_b", pa.string()),
]
FRAME_FIELDS = [
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("latent_norm", pa.float32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
]


def run_metadata(job: RenderJob, scheduler_config: dict[str, Any] | None = None) -> dict[str, str]:
    """Schema metadata carried by every shard: what produced these frames."""
    s = job.sampling
    return {
        "hpcwalk_version": hpcwalk.__version__,
        "model_id": job.model.id,
        "model_revision": job.model.revision or "",
        **_model_metadata(job, scheduler_config),  # model_format/_path/_config/_config_rule/_variant, prediction_type
        "scheduler": s.scheduler,
        "scheduler_config": json.dumps(scheduler_config or {}, sort_keys=True, default=str),
        "steps": str(s.steps),
        "guidance": str(s.guidance),
        "negative_prompt": s.negative_prompt,
        "dtype": job.render.dtype,
        "quantize": job.compile.describe_quantize(),  # "none", or the FP8 path (not exact) and its torchao version
        "clip_model": "",  # "" = no CLIP columns; else the model behind clip_* (and clip2_model: clip2_*)
        **{f"{prefix}_model": f"{m}/{p}" for prefix, m, p in job.clip.models(job.model.id)},
        "encoder_model": job.encoder.resolved(job.model.id),  # "" = no encoder_image column (hpcwalk/render/encoder.py)
        "image_format": job.output.image_format,
        "job_fingerprint": job.fingerprint(),
    }


def _model_metadata(job: RenderJob, scheduler_config: dict[str, Any] | None) -> dict[str, str]:
    """How the model loads (hpcwalk.sd.weights.describe; needs no torch), and its prediction type."""
    from hpcwalk.sd.weights import describe

    m = job.model
    return {**describe(m.id, m.revision, m.config, m.variant),
            "prediction_type": str((scheduler_config or {}).get("prediction_type", "epsilon"))}


def encode_image(frame: np.ndarray, fmt: str = "png") -> bytes:
    """uint8 (H, W, 3) -> PNG (default), lossless WebP, or JPEG q95 bytes; deterministic."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(frame)
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif fmt == "webp":
        img.save(buf, format="WEBP", lossless=True)
    else:
        img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def frames_table(rows: list[FrameRow], images: list[bytes], latent_norm: np.ndarray, shard: int,
                 height: int, width: int, extra: dict[str, pa.Array] | None = None,
                 metadata: dict[str, str] | None = None) -> pa.Table:
    """Provenance columns + frame columns (+ extra columns, e.g. CLIP) as one Arrow table."""
    n = len(rows)
    cols: dict[str, pa.Array] = {}
    for f in PROVENANCE_FIELDS:
        cols[f.name] = pa.array([getattr(r, f.name) for r in rows], type=f.type)
    cols["shard"] = pa.array([shard] * n, pa.int32())
    cols["latent_norm"] = pa.array(np.asarray(latent_norm, np.float32))
    cols["width"] = pa.array([width] * n, pa.int32())
    cols["height"] = pa.array([height] * n, pa.int32())
    cols["image"] = pa.array(images, pa.binary())
    fields = PROVENANCE_FIELDS + FRAME_FIELDS
    for name, arr in (extra or {}).items():
        cols[name] = arr
        fields = fields + [pa.field(name, arr.type)]
    schema = pa.schema(fields, metadata=metadata)
    return pa.Table.from_pydict(cols, schema=schema)
