"""hpcwalk: latent-space walks of Stable Diffusion 1.x at cluster scale."""


__version__ = "0.1.0"
