"""The latent stage of a latent diffusion model: a diffusion U-Net on a frozen autoencoder's latents.

``stage: latent`` in a config trains the second stage of a latent model (Rombach et al.
2022; Pinaya et al. 2022's brain LDM): every training scan is encoded once by the frozen
autoencoder of ``autoencoder.checkpoint`` (posterior mean of a KL autoencoder, the
pre-quantisation encoder output ``z_e`` of a VQ one; in tiles where ``autoencoder.tile`` is
set; the kind is the file's, whatever ``autoencoder.kind`` says), scaled to unit variance (1 / std of these latents, Rombach
et al. Sec. 4.3.2) and cached (:mod:`medidiff.training.latents`), so an epoch never
re-encodes. The diffusion U-Net then trains on the cached latents with the loop, objective
(eps / v / x0 / rectified flow), EMA, AMP, DDP and resume of the diffusion
:class:`~medidiff.training.trainer.Trainer`.

The inference file holds both stages (network ``latent_diffusion``, see
:mod:`medidiff.models.latent`), so ``synthesize``, ``anomaly`` and ``calibrate`` take it
like any checkpoint; previews are decoded samples.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medidiff.errors import CheckpointError, ConfigError
from medidiff.training.latents import LatentCache, cache_key, encode_volumes
from medidiff.training.trainer import Trainer

__all__ = ["LatentDataset", "LatentTrainer", "resolve_autoencoder_path"]

#: what must agree between the data of the latent stage and the autoencoder's grid
_GRID_KEYS = ("modality", "spacing", "shape")


class LatentDataset(torch.utils.data.Dataset):
    """Cached latents served like images (``{"image": (C, *latent)}``), with the image
    dataset's preprocessing, intensity reference and class labels.

    Args:
        cache: the encoded items.
        preprocessing: the image grid's settings (a dict, stored with the weights).
        intensity_reference: the training scans' typical intensity map, or ``None``.
        labels: one class index per item, or ``None``.
        class_names: the class vocabulary of ``labels``.
        input_profile: the training scans' input profile (stored with the weights), or ``None``.
    """

    def __init__(
        self,
        cache: LatentCache,
        preprocessing: dict[str, Any],
        intensity_reference: dict[str, Any] | None = None,
        labels: list[int] | None = None,
        class_names: tuple[str, ...] | None = None,
        input_profile: dict[str, Any] | None = None,
    ) -> None:
        self.cache = cache
        self.input_profile = input_profile
        self._preprocessing = dict(preprocessing)
        self.intensity_reference = intensity_reference
        self.labels = labels
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"image": self.cache.latents[index]}
        if self.labels is not None:
            item["class_label"] = torch.tensor(self.labels[index], dtype=torch.long)
        return item

    def preprocessing_dict(self) -> dict[str, Any]:
        return dict(self._preprocessing)


def resolve_autoencoder_path(checkpoint: str, config_dir: str | os.PathLike | None) -> Path:
    """``autoencoder.checkpoint`` against the config's folder first, then as given."""
    path = Path(os.path.expanduser(checkpoint))
    if config_dir is not None and not path.is_absolute() and (Path(config_dir) / path).exists():
        return Path(config_dir) / path
    return path


def _tile(tile: list[int] | None) -> int | tuple[int, ...] | None:
    if tile is None:
        return None
    return int(tile[0]) if len(tile) == 1 else tuple(int(t) for t in tile)


class LatentTrainer(Trainer):
    """Trains the diffusion U-Net of a latent model (``stage: latent``).

    Args:
        config: the run config; ``autoencoder.checkpoint`` names the trained autoencoder.
        run_dir, device, dataset, progress, config_dir: as for
            :class:`~medidiff.training.trainer.Trainer`; a given ``dataset`` holds images
            (tensors ``(1, *spatial)`` or dicts with ``image``), encoded here.

    Raises:
        CheckpointError: the autoencoder file is missing or not an autoencoder.
        ConfigError: the U-Net's dimensions or the data grid differ from the autoencoder's,
            or ``data.patch_size`` is set (latent models train on whole latents).

    Example:
        >>> import tempfile, torch
        >>> from medidiff.config import Config
        >>> from medidiff.training.autoencoder import AutoencoderTrainer
        >>> common = {"model": {"spatial_dims": 2, "preset": "tiny"},
        ...           "autoencoder": {"preset": "tiny", "scale_batches": 2},
        ...           "data": {"preprocessing": {"shape": [16, 16, 4]}},
        ...           "train": {"max_steps": 1, "batch_size": 2, "checkpoint_every": 0,
        ...                     "preview_every": 0, "log_every": 1}}
        >>> data = [torch.rand(1, 16, 16) for _ in range(4)]
        >>> ae = AutoencoderTrainer(Config.from_dict({**common, "stage": "autoencoder"}),
        ...                         tempfile.mkdtemp(), dataset=data, progress=False).fit()
        >>> cfg = Config.from_dict({**common, "stage": "latent", "autoencoder": {
        ...     "preset": "tiny", "checkpoint": str(ae.model_path)}})
        >>> LatentTrainer(cfg, tempfile.mkdtemp(), dataset=data, progress=False).fit().steps
        1
    """

    network_name = "latent_diffusion"

    def __init__(
        self,
        config: Any,
        run_dir: str | os.PathLike,
        *,
        dataset: Any = None,
        config_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        from medidiff.models.loaded import load_autoencoder

        a = config.autoencoder
        if config.data.patch_size:
            raise ConfigError(
                "data.patch_size does not apply to stage: latent (the U-Net trains on whole "
                "latents); remove it"
            )
        path = resolve_autoencoder_path(a.checkpoint, config_dir)
        if not path.exists():
            raise CheckpointError(f"{path}: autoencoder.checkpoint not found (train one with stage: autoencoder)")
        self.autoencoder = load_autoencoder(path, "cpu")
        ae_dims = int(self.autoencoder.checkpoint.model_kwargs["spatial_dims"])
        if ae_dims != int(config.model.spatial_dims):
            raise ConfigError(
                f"model.spatial_dims is {config.model.spatial_dims} but the autoencoder {path} is {ae_dims}D"
            )
        self._check_grid(config, path)
        self._images = dataset
        super().__init__(config, run_dir, dataset=None, config_dir=config_dir, **kwargs)
        self.autoencoder.network.to(self.device)

    def _check_grid(self, config: Any, path: Path) -> None:
        ours = config.data.preprocessing or {}
        theirs = self.autoencoder.checkpoint.preprocessing  # as stored, without defaults
        for key in _GRID_KEYS:
            if key in ours and theirs.get(key) is not None and list(_as_list(ours[key])) != list(_as_list(theirs[key])):
                raise ConfigError(
                    f"data.preprocessing.{key} is {ours[key]} but the autoencoder {path} was "
                    f"trained with {theirs[key]}; a latent model uses its autoencoder's grid"
                )

    # ---- what is trained ----------------------------------------------------------------
    def _build_network(self) -> tuple[dict, nn.Module]:
        from medidiff.diffusion.guidance import class_embeddings
        from medidiff.models.unet import build_model_from_kwargs, model_kwargs

        m = self.config.model
        overrides = {
            k: getattr(m, k)
            for k in ("channels", "attention_levels", "num_res_blocks", "num_head_channels", "norm_num_groups")
            if getattr(m, k) is not None
        }
        channels = self.autoencoder.latent_channels
        kwargs = model_kwargs(
            m.spatial_dims, m.preset, in_channels=channels, out_channels=channels,
            num_class_embeds=class_embeddings(m.num_class_embeds), **overrides,
        )
        return kwargs, build_model_from_kwargs(kwargs)

    # ---- data: encoded once ---------------------------------------------------------------
    def _build_dataset(self) -> LatentDataset:
        images = self._images
        if images is None:
            images = super()._build_dataset()
        items = [images[i] for i in range(len(images))]
        tensors = [torch.as_tensor(i["image"] if isinstance(i, dict) else i, dtype=torch.float32) for i in items]
        labels = None
        if items and isinstance(items[0], dict) and items[0].get("class_label") is not None:
            labels = [int(i["class_label"]) for i in items]
        names = [f"item-{i}" for i in range(len(tensors))]
        cache = self._encode(tensors, names, images)
        preprocessing = dict(self.config.data.preprocessing or self.autoencoder.checkpoint.preprocessing)
        if hasattr(images, "preprocessing_dict"):
            preprocessing = images.preprocessing_dict()
        reference = getattr(images, "intensity_reference", None)
        return LatentDataset(cache, preprocessing, reference, labels, getattr(images, "class_names", None),
                             getattr(images, "input_profile", None))

    def _encode(self, tensors: list[torch.Tensor], names: list[str], images: Any) -> LatentCache:
        """Encode the training items, or read them from ``RUN_DIR/cache`` when encoded before
        with the same autoencoder, scans and tiling."""
        a = self.config.autoencoder
        sources = [str(e.image) for e in getattr(images, "entries", [])] or names
        shapes = sorted({tuple(t.shape) for t in tensors})
        key = cache_key(self.autoencoder.provenance.sha256, [*sources, f"n={len(tensors)}", str(shapes)], a.tile)
        path = self.run_dir / "cache" / f"latents-{key}.pt"
        if path.exists():
            cached = LatentCache.load(path)
            if len(cached) == len(tensors):
                return cached
        cache = encode_volumes(
            self.autoencoder.network, tensors, names, tile=_tile(a.tile), overlap=a.overlap,
            device=self.device, progress=self.progress,
        )
        if self.info.is_main:
            cache.save(path)
        return cache

    # ---- state ------------------------------------------------------------------------------
    def _training_state(self) -> dict:
        state = super()._training_state()
        state["autoencoder_sha256"] = self.autoencoder.provenance.sha256
        return state

    def _restore_extra(self, state: dict) -> None:
        saved = state.get("autoencoder_sha256")
        if saved is not None and saved != self.autoencoder.provenance.sha256:
            raise CheckpointError(
                f"--resume: the autoencoder {self.autoencoder.provenance.path} is not the one this "
                "run started with (its SHA-256 differs); the latents would not match"
            )

    def _inference_extra(self) -> dict:
        extra = super()._inference_extra()
        ae = self.autoencoder
        a = self.config.autoencoder
        extra["latent"] = {
            "scale_factor": self.dataset.cache.scale_factor,
            "kind": ae.kind,
            "factor": ae.downsample_factor,
            "latent_shape": list(self.dataset.cache.latents.shape[1:]),
            "tile": a.tile,
            "overlap": a.overlap,
            "autoencoder": {"path": str(ae.provenance.path), "sha256": ae.provenance.sha256,
                            "step": ae.provenance.step},
        }
        return extra

    def save_inference(self) -> Path:
        """One ``model.safetensors`` with the U-Net (EMA weights) and the frozen autoencoder."""
        from medidiff.models.checkpoint import save_inference
        from medidiff.models.latent import latent_model_kwargs

        path = self.run_dir / "model.safetensors"
        if self.info.is_main:
            state = {f"unet.{k}": v for k, v in self.inference_state_dict().items()}
            state.update({f"autoencoder.{k}": v for k, v in self.autoencoder.network.state_dict().items()})
            save_inference(
                path, state,
                model_kwargs=latent_model_kwargs(
                    self.model_kwargs, self.autoencoder.checkpoint.model_kwargs, self.autoencoder.kind
                ),
                config=self.config.to_dict(), preprocessing=self.preprocessing,
                extra=self._inference_extra(), network=self.network_name,
            )
        return path

    def decode_preview(self, latents: torch.Tensor) -> torch.Tensor:
        """Previews show decoded images."""
        from medidiff.models.latent import LatentCodec

        codec = LatentCodec(self.autoencoder.network, self.dataset.cache.scale_factor,
                            tile=_tile(self.config.autoencoder.tile), overlap=self.config.autoencoder.overlap)
        return codec.decode(latents).clamp(0, 1)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
