"""Imports every family module so that each registers itself (one line per family)."""
from . import llama  # noqa: F401
