"""Empirical risk minimisation (Vapnik 1992): the mean (label-smoothed) cross-entropy."""

from __future__ import annotations

from .base import Method, method


@method("erm")
class ERM(Method):
    """Plain ERM, the baseline every other method is compared with."""
