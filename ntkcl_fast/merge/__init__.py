"""Model merging (API.md, "Model merging"): mergekit's methods on tensors and on checkpoints."""
from ._tensors import METHODS, merge_tensors
from .engine import merge_checkpoints

__all__ = ["METHODS", "merge_checkpoints", "merge_tensors"]
