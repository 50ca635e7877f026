"""Layer 3 (beside render): the run folder on disk. The Parquet schema and run metadata
(schema.py), the shard writer and commit markers (writer.py), verified reads (reader.py),
verification and repair (verify.py), the lock (runlock.py), the run's walks index (runindex.py),
run.json recovery (runfolder.py). Imports job, sd, core.

Stable import paths (documented for users): `hpcwalk.store.read_frames`,
`hpcwalk.store.read_verified`, `hpcwalk.store.verify_run`.
"""

from hpcwalk.store.reader import read_frames, read_verified, verify_run

__all__ = ["read_frames", "read_verified", "verify_run"]
