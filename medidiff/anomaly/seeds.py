"""The one derivation of noise seeds for anomaly scoring.

Every network input (an axial slice of a 2D model, a volume or a sliding window of a 3D
model) draws its noise from a seed derived from ``(seed, scan name, slice index, window
origin)``; start ``k`` of a method and patch ``p`` of ``patched`` derive their own seeds
from it. The detector, the methods and the figures all call these functions, so the same
seed gives the same map whatever the batch size, the order of the scans, the worker or the
rank that processes them, and a figure shows exactly the noise the detector drew.

Example:
    >>> noise_seed(0, "sub-001", 12, (0, 0)) == start_seed(input_seed(0, "sub-001", 12, (0, 0)), 0)
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

__all__ = ["input_seed", "noise_seed", "patch_seed", "stable_seed", "start_seed"]


def stable_seed(*parts: Any) -> int:
    """A seed in ``[0, 2**62)`` derived from ``parts`` (stable across runs and processes).

    Python's ``hash`` of strings changes per process; BLAKE2 of the parts' ``repr`` does not.

    Example:
        >>> stable_seed(0, "sub-001", 12) == stable_seed(0, "sub-001", 12)
        True
    """
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def input_seed(seed: int, name: str, index: int, origin: Sequence[int]) -> int:
    """The base seed of one network input.

    Args:
        seed: the detector's seed.
        name: the scan's name.
        index: the axial slice (2D model) or 0 (3D model).
        origin: the window's start along each spatial axis (all 0 without windows).
    """
    return stable_seed(seed, name, index, tuple(int(o) for o in origin))


def start_seed(base: int, k: int) -> int:
    """The seed of start ``k`` (index into the method's ``t_starts``) of an input."""
    return stable_seed(base, k)


def patch_seed(start: int, p: int) -> int:
    """The seed of patch ``p`` of ``patched`` (``start`` from :func:`start_seed`)."""
    return stable_seed(start, "patch", p)


def noise_seed(seed: int, name: str, index: int, origin: Sequence[int], k: int = 0) -> int:
    """The seed of the noise of start ``k`` of one network input (not ``patched``)."""
    return start_seed(input_seed(seed, name, index, origin), k)
