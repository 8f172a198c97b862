"""Mimi codec in MLX: streaming, numerically matching Kyutai's PyTorch reference (MODEL.md §10)."""

from engine.mimi.codec import Mimi
from engine.mimi.weights import expected_mimi_shapes, random_mimi_weights

__all__ = ["Mimi", "expected_mimi_shapes", "random_mimi_weights"]
