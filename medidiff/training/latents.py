"""Latents of a frozen autoencoder, computed once per training run (latent diffusion, stage 2).

The diffusion U-Net of a latent model trains on ``z = scale_factor * mu(x)`` of every
training volume (``z_e(x)``, before quantisation, for a VQ autoencoder; see
:func:`medidiff.models.autoencoder.to_latent`). Encoding is the costly part of a step, and the autoencoder is frozen, so
the latents are computed once, in tiles, and kept (in memory, and in
``RUN_DIR/cache/latents-<sha>.pt`` keyed by the autoencoder weights' hash and the list of
scans, so a resumed run or a second run on the same autoencoder does not re-encode).

The scale factor (1 / std of the training latents; Rombach et al. 2022, Sec. 4.3.2) is
measured on these same latents unless the autoencoder checkpoint already stores one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["LatentCache", "encode_volumes", "cache_key"]


@dataclass(frozen=True)
class LatentCache:
    """Encoded training volumes.

    Attributes:
        latents: ``(N, C, h, w[, d])`` scaled latents, float32, CPU.
        scale_factor: the factor they carry.
        names: one name per volume, in order.
    """

    latents: torch.Tensor
    scale_factor: float
    names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __getitem__(self, index: int) -> dict:
        return {"image": self.latents[index]}

    def save(self, path: str | os.PathLike) -> Path:
        from medidiff.models.training_state import save_training_state

        return save_training_state(
            path, {"latents": self.latents, "scale_factor": self.scale_factor, "names": list(self.names)}
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatentCache:
        from medidiff.models.training_state import load_training_state

        state = load_training_state(path)
        return cls(latents=state["latents"], scale_factor=float(state["scale_factor"]),
                   names=tuple(state["names"]))


def cache_key(autoencoder_sha256: str, names: Sequence[str], tile: object) -> str:
    """A short hash of what the cached latents depend on."""
    h = hashlib.sha256(autoencoder_sha256.encode())
    for n in names:
        h.update(b"\0" + n.encode())
    h.update(repr(tile).encode())
    return h.hexdigest()[:16]


def encode_volumes(
    autoencoder: nn.Module,
    volumes: Sequence[torch.Tensor],
    names: Sequence[str],
    *,
    scale_factor: float | None = None,
    tile: int | Sequence[int] | None = None,
    overlap: float = 0.25,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> LatentCache:
    """Encode model-grid volumes ``(1, *spatial)`` with the autoencoder's posterior mean
    (``z_e`` for a VQ autoencoder).

    Args:
        autoencoder: a frozen ``AutoencoderKL`` or ``VQVAE``.
        volumes: one ``(C, *spatial)`` tensor per scan.
        names: a name per scan (for the cache and error messages).
        scale_factor: the latent scale; ``None``: measured here as 1 / std.
        tile, overlap: tiling of the encoder (see :func:`medidiff.models.autoencoder.encode_tiled`).
        device: where to encode.
        progress: report progress (:class:`~medidiff.runtime.progress.Progress`).
    """
    from medidiff.models.autoencoder import encode_tiled, latent_scale_factor

    if len(volumes) != len(names):
        raise ValueError("encode_volumes: one name per volume")
    autoencoder = autoencoder.to(device).eval()
    iterator = zip(volumes, names)
    if progress:
        from medidiff.runtime.progress import progress_iter

        iterator = progress_iter(iterator, "encode", total=len(volumes), unit="scan")
    raw = []
    for volume, _name in iterator:
        x = torch.as_tensor(volume, dtype=torch.float32)[None].to(device)
        raw.append(encode_tiled(autoencoder, x, tile=tile, overlap=overlap).cpu())
    latents = torch.cat(raw)
    factor = latent_scale_factor([latents]) if scale_factor is None else float(scale_factor)
    return LatentCache(latents=latents * factor, scale_factor=factor, names=tuple(names))
