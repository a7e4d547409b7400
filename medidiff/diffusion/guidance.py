"""Class conditioning and classifier-free guidance (Ho & Salimans 2022).

Mask conditioning (label maps as one-hot channels, :mod:`medidiff.data.labels`) follows
the same recipe with a **null condition**, every channel -1 (:func:`null_condition`):
training replaces a sample's whole condition by it with probability
``conditioning.dropout`` (:func:`drop_condition`), and :func:`mask_guided_model_fn`
combines the conditional and null passes. :func:`concat_condition` is the input of a
``concat`` model: ``[x_t, condition]`` along channels, the condition resized to x_t's grid
by nearest neighbour (e.g. a latent grid).

The "+1 null class" rule lives here and nowhere else: a model conditioned on ``n``
classes is built with ``n + 1`` class embeddings (:func:`class_embeddings`); the extra,
last row (index ``n``, :func:`null_class_index`) means "no class". Training drops labels
to it with probability ``train.cond_drop_prob`` (:func:`drop_labels`), so the model also
learns the unconditional case; sampling with guidance combines both
(:func:`guided_model_fn`); an unconditional call on a conditional model passes the null
label (:func:`conditional_model_fn` with no label).

Example:
    >>> import torch
    >>> class_embeddings(2), null_class_index(2), class_embeddings(None)
    (3, 2, None)
    >>> drop_labels(torch.tensor([0, 1]), torch.tensor([True, False]), 2).tolist()
    [2, 1]
"""

from __future__ import annotations

import torch
from torch import Tensor

from collections.abc import Callable

import torch.nn.functional as F

from medidiff.data.labels import NULL_VALUE
from medidiff.diffusion.sampling import ModelFn
from medidiff.errors import ConfigError

#: A mask-conditioned denoiser: ``(x_t (B, C, ...), t (B,), condition (B, L, ...)) -> output``.
ConditionedFn = Callable[[Tensor, Tensor, Tensor], Tensor]

__all__ = [
    "ConditionedFn",
    "class_embeddings",
    "concat_condition",
    "drop_condition",
    "mask_guided_model_fn",
    "null_condition",
    "conditional_model_fn",
    "drop_labels",
    "guided_model_fn",
    "null_class_index",
    "resolve_null_label",
]


def class_embeddings(num_classes: int | None) -> int | None:
    """The ``num_class_embeds`` of a U-Net conditioned on ``num_classes`` classes: one
    more, for the null class; ``None`` (unconditional) for ``None`` or 0."""
    return int(num_classes) + 1 if num_classes else None


def null_class_index(num_classes: int) -> int:
    """The label of the null class of a model conditioned on ``num_classes`` classes: the
    last embedding row, ``num_classes``."""
    return int(num_classes)


def drop_labels(labels: Tensor, drop: Tensor, num_classes: int) -> Tensor:
    """Condition dropout for classifier-free guidance training.

    Args:
        labels: class labels, ``(B,)`` long in ``0 .. num_classes - 1``.
        drop: ``(B,)`` bool, where to replace the label by the null class.
        num_classes: the classes the model is conditioned on (without the null class).

    Returns:
        ``(B,)`` long labels, the null class where ``drop``.
    """
    return torch.where(drop, torch.full_like(labels, null_class_index(num_classes)), labels)


def resolve_null_label(model: torch.nn.Module, null_label: int = -1) -> int:
    """The class index that means "no class" for a class-conditional MONAI U-Net.

    ``nn.Embedding`` cannot look up -1, so a negative ``null_label`` counts from the end of
    the model's class-embedding table: -1 is row ``num_class_embeds - 1``, reserved for the
    unconditional case (:func:`null_class_index`). Training with condition dropout uses
    the same index (:func:`drop_labels`).

    Args:
        model: a ``DiffusionModelUNet`` built with ``num_class_embeds`` (possibly wrapped in
            DDP, whose ``.module`` is used).
        null_label: the null class; negative counts from the end.

    Returns:
        A non-negative class index.

    Raises:
        ConfigError: the model has no class embedding, or the index is out of range.
    """
    inner = getattr(model, "module", model)
    num_classes = getattr(inner, "num_class_embeds", None)
    if num_classes is None:
        raise ConfigError("classifier-free guidance needs a model built with num_class_embeds")
    index = num_classes + null_label if null_label < 0 else null_label
    if not 0 <= index < num_classes:
        raise ConfigError(f"null_label {null_label} is outside the model's {num_classes} classes")
    return index


def guided_model_fn(
    model: torch.nn.Module,
    class_labels: Tensor,
    guidance: float,
    *,
    null_label: int = -1,
) -> ModelFn:
    """A ``model_fn`` with classifier-free guidance over class labels.

    output = out_uncond + w (out_cond - out_uncond), with out_cond = model(x, t, labels) and
    out_uncond = model(x, t, null label). So ``guidance = 0`` is exactly the unconditional
    model (one pass on the null label), ``guidance = 1`` exactly the conditional model (one
    pass), and ``w > 1`` strengthens the condition; other values run one network call on a
    batch of 2B. The combination is linear, so it applies to any prediction type.

    Args:
        model: a ``DiffusionModelUNet`` (``forward(x, timesteps, context=None,
            class_labels=None)``) with ``num_class_embeds``.
        class_labels: the wanted classes, ``(B,)`` long.
        guidance: the guidance weight w.
        null_label: the "no class" index, see :func:`resolve_null_label`.

    Returns:
        ``model_fn(x_t, t) -> output``.
    """
    null = resolve_null_label(model, null_label)
    labels = class_labels.long()

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        cond = labels.to(x_t.device)
        uncond = torch.full_like(cond, null)
        if guidance == 0:
            return model(x_t, t, class_labels=uncond)
        if guidance == 1:
            return model(x_t, t, class_labels=cond)
        both = model(
            torch.cat([x_t, x_t]), torch.cat([t, t]), class_labels=torch.cat([uncond, cond])
        )
        out_uncond, out_cond = both.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    return model_fn


def conditional_model_fn(
    model: torch.nn.Module,
    num_classes: int | None,
    batch: int,
    *,
    label: int | None = None,
    guidance: float = 0.0,
    device: torch.device | str | None = None,
) -> ModelFn:
    """The ``model_fn`` the samplers call for a batch, whatever the model's conditioning.

    An unconditional model (``num_classes`` None) is called as is. A conditional one goes
    through :func:`guided_model_fn` with ``label`` for every sample; without a label every
    sample gets the null class at guidance 0, one network pass on the null label, which
    is exactly the unconditional path.

    Args:
        model: the ``DiffusionModelUNet``.
        num_classes: the classes the model is conditioned on (without the null class).
        batch: the batch size B.
        label: the class to generate, or ``None`` (unconditional).
        guidance: the guidance weight w (used with a label).
        device: where the labels live (default: the CPU; moved to x_t's device anyway).

    Returns:
        ``model_fn(x_t, t) -> output``.
    """
    if num_classes is None:
        return lambda x_t, t: model(x_t, timesteps=t)
    index = resolve_null_label(model) if label is None else int(label)
    labels = torch.full((batch,), index, dtype=torch.long, device=device)
    return guided_model_fn(model, labels, guidance if label is not None else 0.0)


# ------------------------------------------------------------------------ mask conditioning


def null_condition(condition: Tensor) -> Tensor:
    """The null condition of classifier-free guidance, shaped like ``condition``: every
    channel :data:`~medidiff.data.labels.NULL_VALUE` (-1), which no label map produces."""
    return torch.full_like(condition, NULL_VALUE)


def drop_condition(condition: Tensor, drop: Tensor) -> Tensor:
    """Condition dropout for classifier-free guidance training.

    Args:
        condition: ``(B, L, *spatial)`` one-hot label channels.
        drop: ``(B,)`` bool, which samples get the null condition.

    Returns:
        ``(B, L, *spatial)``: the null condition where ``drop``, else ``condition``.
    """
    where = drop.view(-1, *([1] * (condition.ndim - 1)))
    return torch.where(where, null_condition(condition), condition)


def concat_condition(x_t: Tensor, condition: Tensor) -> Tensor:
    """The input of a ``concat`` model: ``(B, C + L, *spatial)``, x_t then the condition.

    The condition is resized to x_t's grid by nearest neighbour when the grids differ (a
    latent model's condition is given on the image grid).
    """
    if tuple(condition.shape[2:]) != tuple(x_t.shape[2:]):
        condition = F.interpolate(condition.float(), size=tuple(x_t.shape[2:]), mode="nearest")
    return torch.cat([x_t, condition.to(device=x_t.device, dtype=x_t.dtype)], dim=1)


def mask_guided_model_fn(net: ConditionedFn, condition: Tensor, guidance: float) -> ModelFn:
    """A ``model_fn(x_t, t)`` with classifier-free guidance over a label-map condition.

    output = out_null + w (out_cond - out_null), with out_cond = net(x_t, t, condition) and
    out_null = net(x_t, t, null condition). ``guidance = 1`` is exactly the conditional
    model (one pass), ``0`` exactly the unconditional one (one pass on the null
    condition); other values run one call on a batch of 2B.

    Args:
        net: the conditioned denoiser ``(x_t, t, condition) -> output``.
        condition: ``(B, L, *spatial)`` one-hot label channels (on the image or network grid).
        guidance: the guidance weight w >= 0.

    Returns:
        ``model_fn(x_t, t) -> output``.
    """
    cond = condition.float()
    null = null_condition(cond)

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        c = cond.to(x_t.device)
        if guidance == 1:
            return net(x_t, t, c)
        if guidance == 0:
            return net(x_t, t, null.to(x_t.device))
        both = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([null.to(x_t.device), c]))
        out_null, out_cond = both.chunk(2)
        return out_null + guidance * (out_cond - out_null)

    return model_fn
