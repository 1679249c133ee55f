"""Continual-learning metrics from the accuracy matrix.

``acc[i, j]`` is the accuracy on task ``j``'s test data after training task ``i`` (``j <= i``;
entries above the diagonal are not used).
"""
from __future__ import annotations

import numpy as np


def final_accuracy(acc) -> float:
    """A_T: mean accuracy over all tasks after the last task."""
    acc = np.asarray(acc, dtype=float)
    return float(acc[-1, :acc.shape[0]].mean())


def average_incremental_accuracy(acc) -> float:
    """Mean over i of A_i, A_i = mean_{j <= i} acc[i, j]."""
    acc = np.asarray(acc, dtype=float)
    return float(np.mean([acc[i, :i + 1].mean() for i in range(acc.shape[0])]))


def forgetting(acc) -> float:
    """Mean over tasks j < T-1 of max_{j <= i < T-1} acc[i, j] - acc[T-1, j] (0 for one task)."""
    acc = np.asarray(acc, dtype=float)
    t = acc.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([acc[j:t - 1, j].max() - acc[t - 1, j] for j in range(t - 1)]))


def summary(acc) -> dict[str, float]:
    return dict(A_T=final_accuracy(acc), avg_inc=average_incremental_accuracy(acc), forgetting=forgetting(acc))
