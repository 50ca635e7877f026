"""Triton kernels, imported as hpcwalk.kernels: one op per file (kernel + torch reference + dispatch).

- `guided_dpm.guided_dpm_step`: classifier-free guidance fused with the DPM-Solver++(2M) update.
- `decode_postprocess.decode_postprocess`: VAE output -> NHWC uint8 in one pass (bit-equal to torch).

Each op runs compiled Triton on CUDA, Triton's interpreter on the CPU with TRITON_INTERPRET=1, and
its torch reference elsewhere; `op.last_path` says which ran (see `_dispatch.py`).
"""
