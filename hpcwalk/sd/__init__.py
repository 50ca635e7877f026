"""Layer 1: Stable Diffusion itself. Weight formats and where they are found (weights.py), loaders
and the CLIP tokenizer (loaders.py), presets and built-in random models (models.py), the `[compile]`
speed options (compile.py), FP8 (fp8.py), device memory (memory.py). Imports only hpcwalk.core."""
