"""Triton kernels, imported as hpcwalk.kernels: one op per file (kernel + torch reference + dispatch)."""
