"""Label maps for mask-conditioned models: names, integer maps and one-hot channels.

A mask-conditioned model (``conditioning.labels`` of its config) sees a **label map**: one
integer per voxel, 0 for background and ``i + 1`` for ``labels[i]``. The network gets it
as ``len(labels)`` one-hot channels (channel ``i`` is 1 where the map is ``i + 1``, else 0)
and, for classifier-free guidance, the **null condition**: every channel
:data:`NULL_VALUE` (-1), a value no real map produces, so "no condition" is never confused
with "no lesion" (all zeros).

Where label maps come from in training: :func:`compose_label_map` combines a case's brain
mask and lesion label by the label names:

==========  =================================================================
name        voxels
==========  =================================================================
``brain``   the brain mask (``mask`` of the datalist entry)
``lesion``  the lesion label (``label`` / ``segmentation``) of any kind
other       the lesion label of entries whose ``kind`` equals the name
            (``tumor``, ``ms``, ``stroke`` in sample_data)
==========  =================================================================

Later names win where they overlap (a lesion inside the brain is the lesion's value).

Example:
    >>> import numpy as np
    >>> brain = np.array([0, 1, 1, 1]); lesion = np.array([0, 0, 1, 0])
    >>> compose_label_map(["brain", "tumor", "ms"], brain=brain, lesion=lesion, kind="ms").tolist()
    [0, 1, 3, 1]
    >>> one_hot(np.array([0, 1, 3]), 3).tolist()
    [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medidiff.errors import DataError

__all__ = [
    "BRAIN",
    "LESION",
    "NULL_VALUE",
    "compose_label_map",
    "check_label_map",
    "lesion_values",
    "one_hot",
]

#: The label name of the brain mask.
BRAIN = "brain"
#: The label name of a lesion of any kind.
LESION = "lesion"
#: The value of every channel of the null condition (classifier-free guidance).
NULL_VALUE = -1.0


def compose_label_map(
    labels: Sequence[str],
    *,
    brain: np.ndarray | None = None,
    lesion: np.ndarray | None = None,
    kind: str | None = None,
) -> np.ndarray:
    """The label map of one case from its brain mask and lesion label.

    Args:
        labels: the model's label names (``conditioning.labels``).
        brain: brain mask (non-zero inside), or ``None``.
        lesion: lesion label (non-zero inside), or ``None`` (a healthy case).
        kind: the lesion's kind (``tumor``, ``ms``, ...) for kind-named labels.

    Returns:
        ``uint8`` map of the masks' shape: 0 background, ``i + 1`` for ``labels[i]``.

    Raises:
        DataError: no mask given, or masks of different shapes.
    """
    shapes = {np.shape(a) for a in (brain, lesion) if a is not None}
    if not shapes:
        raise DataError("a label map needs a brain mask or a lesion label")
    if len(shapes) > 1:
        raise DataError(f"brain mask and lesion label differ in shape: {sorted(shapes)}")
    out = np.zeros(shapes.pop(), dtype=np.uint8)
    for i, name in enumerate(labels):
        if name == BRAIN:
            region = brain
        elif name == LESION or (kind is not None and name == kind):
            region = lesion
        else:
            region = None
        if region is not None:
            out[np.asarray(region) > 0] = i + 1
    return out


def lesion_values(labels: Sequence[str], kind: str | None = None) -> list[int]:
    """The label-map values that mean a lesion (of ``kind``, or of any kind when ``None``):
    ``lesion`` and kind names, not ``brain``."""
    return [
        i + 1 for i, name in enumerate(labels)
        if name != BRAIN and (kind is None or name in (LESION, kind))
    ]


def check_label_map(label_map: np.ndarray, labels: Sequence[str], source: str) -> np.ndarray:
    """Check that a label map holds only the values ``0 .. len(labels)``.

    Args:
        label_map: the map (any integer or float dtype holding whole numbers).
        labels: the model's label names.
        source: where the map came from, for the message.

    Returns:
        The map as ``uint8``.

    Raises:
        DataError: other values (names the values allowed).
    """
    values = np.asarray(label_map)
    if not np.all(np.isfinite(values)) or not np.array_equal(values, np.rint(values)):
        raise DataError(f"{source}: a label map must hold whole numbers 0 .. {len(labels)}")
    found = np.unique(values).astype(np.int64)
    bad = [int(v) for v in found if not 0 <= v <= len(labels)]
    if bad:
        legend = ", ".join(f"{i + 1}={n}" for i, n in enumerate(labels))
        raise DataError(
            f"{source}: label value {bad[0]} is not one of the model's labels (0=background, {legend})"
        )
    return values.astype(np.uint8)


def one_hot(label_map: np.ndarray, num_labels: int) -> np.ndarray:
    """One-hot channels of a label map: ``(num_labels, *shape)`` float32, channel ``i`` is 1
    where the map equals ``i + 1``."""
    values = np.asarray(label_map)
    return np.stack([(values == i + 1) for i in range(num_labels)]).astype(np.float32)
