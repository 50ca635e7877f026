"""The static HTML viewer of a run (`hpcwalk view`): see hpcwalk/see/viewer/build.py."""

from hpcwalk.see.viewer.build import ViewerError, ViewerResult, build_viewer, check_out, default_out

__all__ = ["ViewerError", "ViewerResult", "build_viewer", "check_out", "default_out"]
