"""Layer 3 (beside store): making frames on the device. Latent operators (interp.py), the batched
Renderer (engine.py), DDIM inversion (invert.py), CLIP (clip.py) and the image encoder (encoder.py),
per-frame measures computed on the decoded batch (framestats.py). Imports job, sd, core."""
