"""Imports every analytic builder module so that each registers itself."""
from . import llama  # noqa: F401
