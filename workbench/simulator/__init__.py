"""Discrete-event (SimPy) simulator of one training step of a plan on a cluster."""
from .simulate import SimResult, simulate

__all__ = ["SimResult", "simulate"]
