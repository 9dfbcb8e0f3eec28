"""Small statistics shared by the benchmark scripts (run from this folder, so importable)."""

from __future__ import annotations


def percentile(sorted_samples: list[float], q: float) -> float:
    """The sample at quantile ``q`` (0..1) of already sorted samples, nearest rank."""
    index = min(len(sorted_samples) - 1, max(0, round(q * (len(sorted_samples) - 1))))
    return sorted_samples[index]
