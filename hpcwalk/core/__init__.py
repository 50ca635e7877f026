"""Layer 0: what every other layer may use. The one-line error types and `first_line` (errors.py),
pyarrow.fs paths and atomic writes (fsio.py), pure numpy statistics (metrics.py). Imports no other
hpcwalk layer."""
