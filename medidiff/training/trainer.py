"""The Trainer: noise-prediction training of a diffusion U-Net, resumable and DDP-ready.

One optimisation step (Ho et al. 2020, Algorithm 1):

    x_0 ~ data,  t ~ U{0, ..., T-1},  eps ~ N(0, I) (or simplex noise, AnoDDPM)
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps        # medidiff.diffusion.schedules.q_sample
    loss = || target - f_theta(x_t, t) ||^2                         # target: eps, v or x_0

A rectified-flow model (``diffusion.prediction_type: flow``; Liu et al. 2023, see
:mod:`medidiff.diffusion.flow`) instead draws a flow time s in (0, 1) (logit-normal by
default, Esser et al. 2024) and learns the velocity of the straight path:

    x_s = (1 - s) x_0 + s eps,   loss = || (x_0 - eps) - f_theta(x_s, s T - 1) ||^2

with AdamW, linear warm-up then cosine decay of the learning rate, gradient clipping, an
exponential moving average (EMA) of the weights that is used for previews and saved as the
inference weights, AMP on CUDA (bf16 where supported, else fp16 with a GradScaler) and
fp32 on the CPU.

Reproducibility: all randomness of step ``s`` (timesteps, noise, label dropout) comes from
a generator seeded by ``(seed, rank, s)``, and the data order of each epoch from
``(seed, epoch)``; with the optimiser, scheduler and EMA states restored, a resumed run
on the CPU reaches bit-identical weights to an uninterrupted one.

Outputs (DESIGN.md): ``RUN_DIR/model.safetensors``, ``RUN_DIR/config.yaml``,
``RUN_DIR/checkpoints/last.pt``, ``RUN_DIR/metrics.csv``, TensorBoard events under
``RUN_DIR/tb/``, previews under ``RUN_DIR/previews/``.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from medidiff.config import Config
from medidiff.training.ema import EMA
from medidiff.runtime.distributed import DistInfo, any_rank, all_reduce_mean, barrier, init_distributed
from medidiff.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    OutputError,
    TrainingDivergedError,
)

CHECKPOINT_NAME = "last.pt"
METRICS_FIELDS = ["step", "loss", "lr", "grad_norm", "seconds", "samples_per_s"]


def check_run_folder(run_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run in a folder that already holds a trained one.

    ``medidiff train`` calls this before loading any data, and :meth:`Trainer.fit` calls
    it again, so a script that reuses a run folder by mistake is stopped the same way.

    Raises:
        OutputError: ``run_dir`` has ``model.safetensors`` or ``checkpoints/last.pt`` and
            neither ``resume`` nor ``overwrite`` is set.
    """
    run_dir = Path(run_dir)
    existing = [run_dir / "model.safetensors", run_dir / "checkpoints" / "last.pt"]
    if not (resume or overwrite) and any(p.exists() for p in existing):
        raise OutputError(
            f"{run_dir}: already holds a trained run; pass --resume to continue it or "
            "--overwrite to start afresh (Python: fit(resume=True) or fit(overwrite=True))"
        )


@dataclass(frozen=True)
class TrainResult:
    """What :meth:`Trainer.fit` did.

    Attributes:
        run_dir: the run folder.
        model_path: the inference weights (``model.safetensors``).
        steps: the step count reached.
        final_loss: the loss of the last step (mean over ranks).
        seconds: wall time of this call.
        resumed_from: the step a resumed run started at (0 for a fresh run).
    """

    run_dir: Path
    model_path: Path
    steps: int
    final_loss: float
    seconds: float
    resumed_from: int


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on ``(seed, rank, step)``: resuming needs no RNG replay."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank * 10_007 + step) % (2**63 - 1))
    return g


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ResumableSampler(torch.utils.data.Sampler):
    """Shuffled indices of one epoch, seeded by ``(seed, epoch)`` and sharded by rank like
    ``DistributedSampler``; can start part-way through an epoch (for resume)."""

    def __init__(self, n: int, seed: int, info: DistInfo) -> None:
        self.n, self.seed, self.info = n, seed, info
        self.epoch, self.offset = 0, 0
        self.per_rank = math.ceil(n / info.world_size)

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        self.epoch, self.offset = epoch, offset

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        total = self.per_rank * self.info.world_size
        order = (order * (total // max(1, len(order)) + 1))[:total]  # pad so ranks are equal
        mine = order[self.info.rank :: self.info.world_size]
        return iter(mine[self.offset :])

    def __len__(self) -> int:
        return self.per_rank - self.offset


class Trainer:
    """Trains a diffusion U-Net from a :class:`~medidiff.config.Config`.

    Args:
        config: the resolved run config.
        run_dir: output folder (created).
        device: ``auto``, ``cpu`` or ``cuda``.
        dataset: optional in-memory dataset yielding ``(1, *spatial)`` tensors (or dicts
            with ``image`` and ``class_label``); built from ``config.data`` when omitted.
        progress: report progress on rank 0 (a bar on a terminal, a plain line every
            30 s in a log: :class:`~medidiff.runtime.progress.Progress`).

    Example:
        >>> from medidiff.config import Config
        >>> from medidiff.training.trainer import Trainer
        >>> import torch, tempfile
        >>> cfg = Config.from_dict({"model": {"preset": "tiny"},
        ...     "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 0,
        ...               "preview_every": 0, "log_every": 1}})
        >>> data = [torch.rand(1, 16, 16) for _ in range(4)]
        >>> result = Trainer(cfg, tempfile.mkdtemp(), dataset=data, progress=False).fit()
        >>> result.steps
        2
    """

    #: the network name stored with the inference weights
    network_name = "diffusion_unet"

    def __init__(
        self,
        config: Config,
        run_dir: str | os.PathLike,
        *,
        device: str = "auto",
        dataset: Any = None,
        progress: bool = True,
        config_dir: str | os.PathLike | None = None,
    ) -> None:
        # What saving a checkpoint needs is imported now, not at the first save hours later:
        # a package upgraded on disk while a run trains must not break its checkpoints.
        import medidiff.models.checkpoint  # noqa: F401
        import medidiff.models.latent  # noqa: F401
        import medidiff.models.training_state  # noqa: F401

        self.config = config
        self.run_dir = Path(run_dir)
        self.config_dir = Path(config_dir) if config_dir else None
        self.info = init_distributed(device)
        self.device = self.info.device
        self.progress = progress and self.info.is_main
        c = config
        torch.manual_seed(c.train.seed)
        self.model_kwargs, model = self._build_network()
        self.model = model.to(self.device)
        self.use_cuda = self.device.type == "cuda"
        if self.use_cuda and c.train.channels_last:
            fmt = torch.channels_last if c.model.spatial_dims == 2 else torch.channels_last_3d
            self.model = self.model.to(memory_format=fmt)
        self._build_process()
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # a frozen base stays out
        self.optimizer = _adamw(trainable, lr=c.train.lr, weight_decay=c.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, c.train.warmup_steps, c.train.max_steps, c.train.min_lr_ratio),
        )
        self.amp_dtype = None
        if self.use_cuda and c.train.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ema = EMA(self.model, c.train.ema_decay) if c.train.ema_decay > 0 else None
        self.ddp_model: torch.nn.Module = self.model
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(self.model, device_ids=[self.device.index] if self.use_cuda else None)
        self.dataset = dataset if dataset is not None else self._build_dataset()
        if len(self.dataset) == 0:
            raise DataError("the training dataset is empty (no slices or volumes passed the filters)")
        if self.config.train.oversample and not hasattr(self.dataset, "oversampled_indices"):
            raise ConfigError("train.oversample needs a 2D slice dataset with label maps")
        self.step = 0
        self.preprocessing: dict = getattr(self.dataset, "preprocessing_dict", lambda: {})() if hasattr(
            self.dataset, "preprocessing_dict") else {}

    # ---- what is trained ------------------------------------------------------------
    def _build_network(self) -> tuple[dict, torch.nn.Module]:
        """The network's JSON kwargs and the network: a ``DiffusionModelUNet`` here."""
        from medidiff.diffusion.guidance import class_embeddings
        from medidiff.models.unet import build_model_from_kwargs, model_kwargs

        m = self.config.model
        overrides = {
            k: getattr(m, k)
            for k in ("channels", "attention_levels", "num_res_blocks", "num_head_channels", "norm_num_groups")
            if getattr(m, k) is not None
        }
        # One extra class embedding, the last row, is the null class of classifier-free guidance.
        # A concat mask-conditioned model takes the label channels after the image channel.
        kwargs = model_kwargs(
            m.spatial_dims, m.preset, num_class_embeds=class_embeddings(m.num_class_embeds),
            in_channels=1 + self.num_condition_channels, out_channels=1, **overrides
        )
        model = build_model_from_kwargs(kwargs)
        self._init_from_checkpoint(model, kwargs)
        return kwargs, model

    @property
    def num_condition_channels(self) -> int:
        """Label channels concatenated to the network input (``conditioning.mask: concat``)."""
        c = self.config.conditioning
        return len(c.labels) if c.mask == "concat" else 0

    def _init_from_checkpoint(self, model: torch.nn.Module, kwargs: dict) -> None:
        """``init.checkpoint``: start from a trained U-Net (extra input channels at zero)."""
        if not self.config.init.checkpoint:
            return
        from medidiff.models.init_weights import load_init_weights

        load_init_weights(model, kwargs, resolve_config_checkpoint(self.config.init.checkpoint, self.config_dir))

    def _build_process(self) -> None:
        """The forward process the network learns to undo: schedule and noise."""
        from medidiff.diffusion.noise import NoiseSpec
        from medidiff.diffusion.schedules import NoiseSchedule

        self.schedule = NoiseSchedule.from_config(self.config.diffusion).to(self.device)
        self.noise_spec = NoiseSpec.from_config(self.config.diffusion)

    # ---- data ---------------------------------------------------------------------
    def _build_dataset(self) -> Any:
        from medidiff.data.datasets import build_training_dataset

        return build_training_dataset(self.config, run_dir=self.run_dir, config_dir=self.config_dir)

    def _batches(self, start_step: int) -> Iterator[dict]:
        bs = self.config.train.batch_size
        dataset = self.dataset
        if self.config.train.oversample:
            indices = dataset.oversampled_indices(self.config.train.oversample)
            if self.info.is_main:
                print(f"oversample {self.config.train.oversample}: {len(indices)} slices per epoch "
                      f"(from {len(dataset)})", flush=True)
            dataset = torch.utils.data.Subset(dataset, indices.tolist())
        sampler = ResumableSampler(len(dataset), self.config.train.seed, self.info)
        per_epoch = max(1, sampler.per_rank // bs) if sampler.per_rank >= bs else 1
        epoch, offset_batches = divmod(start_step, per_epoch)
        while True:
            sampler.set_epoch(epoch, offset_batches * bs)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)  # 3D random patches: seeded by (seed, epoch, index)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=bs, sampler=sampler, drop_last=sampler.per_rank >= bs,
                num_workers=self.config.data.num_workers, collate_fn=_collate,
            )
            for batch in loader:
                yield batch
            epoch, offset_batches = epoch + 1, 0

    # ---- one step -------------------------------------------------------------------
    def _loss(self, batch: dict, step: int) -> torch.Tensor:
        from medidiff.diffusion.guidance import concat_condition, drop_condition, drop_labels
        from medidiff.diffusion.noise import sample_noise
        from medidiff.diffusion.prediction import training_target
        from medidiff.diffusion.schedules import q_sample

        c = self.config
        x0 = batch["image"].to(self.device, non_blocking=True)
        if self.use_cuda and c.train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last if x0.ndim == 4 else torch.channels_last_3d)
        g = step_generator(c.train.seed, self.info.rank, step, self.device)
        b = x0.shape[0]
        if c.diffusion.prediction_type == "flow":
            x_t, t, target = self._flow_inputs(x0, g)
        else:
            t = torch.randint(0, c.diffusion.num_train_timesteps, (b,), device=self.device, generator=g)
            noise = sample_noise(self.noise_spec, tuple(x0.shape), generator=g, device=self.device)
            x_t = q_sample(self.schedule, x0, t, noise)
            target = training_target(self.schedule, x0, t, noise, prediction_type=c.diffusion.prediction_type)
        condition = batch.get("condition")
        extra = {}
        if c.conditioning.mask != "none":
            if condition is None:
                raise DataError("a mask-conditioned model needs label maps: the dataset serves no 'condition'")
            condition = condition.to(self.device, non_blocking=True).float()
            drop = torch.rand(b, device=self.device, generator=g) < c.conditioning.dropout
            condition = drop_condition(condition, drop)  # the null condition, for guidance
            if c.conditioning.mask == "concat":
                x_t = concat_condition(x_t, condition)
            else:  # a ControlNet reads it
                extra["condition"] = condition
        labels = batch.get("class_label")
        if labels is not None and c.model.num_class_embeds:
            labels = labels.to(self.device).long()
            drop = torch.rand(b, device=self.device, generator=g) < c.train.cond_drop_prob
            labels = drop_labels(labels, drop, c.model.num_class_embeds)  # to the null class
        else:
            labels = None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            pred = self.ddp_model(x_t, timesteps=t, class_labels=labels, **extra)
        return F.mse_loss(pred.float(), target.float())

    def _flow_inputs(
        self, x0: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A rectified-flow training input: ``(x_s, timesteps, target)`` with s drawn per
        sample (``diffusion.flow_time_sampling``), x_s = (1 - s) x_0 + s eps, the network
        timestep s T - 1 (float, ``(B,)``) and the velocity target x_0 - eps."""
        from medidiff.diffusion.flow import (
            flow_interpolate,
            flow_target,
            flow_timestep,
            sample_flow_time,
        )
        from medidiff.diffusion.noise import sample_noise

        d = self.config.diffusion
        s = sample_flow_time(x0.shape[0], method=d.flow_time_sampling, generator=g, device=self.device)
        noise = sample_noise(self.noise_spec, tuple(x0.shape), generator=g, device=self.device)
        timesteps = flow_timestep(s, d.num_train_timesteps)
        return flow_interpolate(x0, noise, s), timesteps, flow_target(x0, noise)

    def _optim_step(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.config.train.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return float(grad_norm)

    def train_step(self, batch: dict) -> tuple[float, float]:
        """One optimisation step on ``batch`` (``{"image": (B, 1, *spatial)}``).

        Returns:
            ``(loss, grad_norm)``: the loss averaged over ranks and the pre-clip norm.

        Raises:
            TrainingDivergedError: the loss is NaN/Inf on any rank (nothing is updated).
        """
        loss = self._loss(batch, self.step)
        bad = not bool(torch.isfinite(loss.detach()).item())
        if any_rank(bad, self.info):
            raise TrainingDivergedError(
                f"loss became {loss.item()} at step {self.step}; stopped. The last good "
                f"checkpoint ({self.checkpoint_path}) is kept; lower train.lr or check the data"
            )
        grad_norm = self._optim_step(loss)
        self.step += 1
        return float(all_reduce_mean(loss.detach(), self.info)), grad_norm

    # ---- state ----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / CHECKPOINT_NAME

    def inference_state_dict(self) -> dict:
        if self.ema is not None:
            return {k: v.clone() for k, v in self.ema.shadow.items()}
        return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}

    def save_checkpoint(self) -> None:
        """Resumable state (atomic) and the inference weights; rank 0 only."""
        from medidiff.models.training_state import capture_rng_state, save_training_state

        if not self.info.is_main:
            return
        state = self._training_state()
        state["rng"] = capture_rng_state()
        save_training_state(self.checkpoint_path, state)
        self.save_inference()

    def _training_state(self) -> dict:
        """What a resumable checkpoint holds (RNG states are added by the caller)."""
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "config": self.config.to_dict(),
        }

    def _restore_extra(self, state: dict) -> None:
        """Restore what a subclass added to :meth:`_training_state` (nothing here)."""

    def _inference_extra(self) -> dict:
        """The ``extra`` JSON stored with the inference weights."""
        from medidiff import __version__

        return {"step": self.step, "medidiff_version": __version__,
                "class_names": list(getattr(self.dataset, "class_names", None) or []),
                "intensity_reference": getattr(self.dataset, "intensity_reference", None),
                "input_profile": getattr(self.dataset, "input_profile", None)}

    def save_inference(self) -> Path:
        from medidiff.models.checkpoint import save_inference

        path = self.run_dir / "model.safetensors"
        if self.info.is_main:
            save_inference(
                path,
                self.inference_state_dict(),
                model_kwargs=self.model_kwargs,
                config=self.config.to_dict(),
                preprocessing=self.preprocessing,
                extra=self._inference_extra(),
                network=self.network_name,
            )
        return path

    def load_checkpoint(self) -> int:
        from medidiff.models.checkpoint import load_state_dict_checked
        from medidiff.models.training_state import load_training_state, restore_rng_state

        path = self.checkpoint_path
        if not path.exists():
            raise CheckpointError(f"{path}: no checkpoint to resume from; run without --resume first")
        state = load_training_state(path)
        saved = Config.from_dict(state["config"])
        for section in ("stage", "model", "diffusion", "data", "autoencoder", "conditioning", "base"):
            if getattr(saved, section) != getattr(self.config, section):
                raise ConfigError(
                    f"--resume: the '{section}' section differs from the checkpoint's ({path}); "
                    "only train settings may change when resuming"
                )
        load_state_dict_checked(self.model, state["model"], str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self._restore_extra(state)
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        return self.step

    # ---- previews and logs -------------------------------------------------------------
    def preview(self) -> Path | None:
        """A PNG grid of a few samples from the EMA weights (DDIM, or Euler for a
        rectified-flow model; few steps)."""
        c = self.config.train
        if not self.info.is_main or c.preview_samples == 0:
            return None
        from medidiff.diffusion.samplers import sampler_for
        from medidiff.diffusion.sampling import sample
        from medidiff.io.images import save_image_grid

        model = self._fresh_network().to(self.device).eval()
        model.load_state_dict(self.inference_state_dict())
        unet_kwargs = self.model_kwargs.get("unet", self.model_kwargs)
        channels = int(unet_kwargs.get("out_channels", 1))
        shape = (c.preview_samples, channels, *self.dataset_spatial_shape())
        model_fn = lambda x, t: model(x, timesteps=t)  # noqa: E731
        mode = self.config.conditioning.mask
        if mode != "none":  # the label maps of training items spread over the set, guidance 1
            from medidiff.diffusion.guidance import concat_condition, mask_guided_model_fn

            step = max(1, len(self.dataset) // c.preview_samples)
            conditions = torch.stack([
                torch.as_tensor(self.dataset[i * step]["condition"]) for i in range(c.preview_samples)
            ]).to(self.device)
            if mode == "concat":
                net = lambda x, t, cond: model(concat_condition(x, cond), timesteps=t)  # noqa: E731
            else:
                net = lambda x, t, cond: model(x, timesteps=t, condition=cond)  # noqa: E731
            model_fn = mask_guided_model_fn(net, conditions, 1.0)
        n_classes = self.config.model.num_class_embeds
        if n_classes:  # one sample per class in turn, plain conditional (guidance 1)
            from medidiff.diffusion.guidance import guided_model_fn

            labels = torch.arange(c.preview_samples, device=self.device) % n_classes
            model_fn = guided_model_fn(model, labels, 1.0)
        with torch.no_grad():
            result = sample(
                model_fn,
                self.schedule, shape, steps=c.preview_steps,
                sampler=sampler_for(self.config.diffusion.prediction_type, None, "ddim"),
                seeds=list(range(c.preview_samples)), device=self.device, noise_spec=self.noise_spec,
                prediction_type=self.config.diffusion.prediction_type,
            )
        path = self.run_dir / "previews" / f"step_{self.step:07d}.png"
        images = self.decode_preview(result.sample)
        save_image_grid(images.float().cpu().numpy(), path, title=f"step {self.step}")
        return path

    def _fresh_network(self) -> torch.nn.Module:
        """A new network of this run's architecture (for previews from the EMA weights)."""
        from medidiff.models.unet import build_model_from_kwargs

        return build_model_from_kwargs(self.model_kwargs)

    def decode_preview(self, samples: torch.Tensor) -> torch.Tensor:
        """What a preview shows of the sampled network outputs: the samples themselves
        (a latent model decodes them)."""
        return samples

    def dataset_spatial_shape(self) -> tuple[int, ...]:
        item = self.dataset[0]
        image = item["image"] if isinstance(item, dict) else item
        return tuple(image.shape[1:])

    # ---- the loop -------------------------------------------------------------------
    def fit(
        self, *, resume: bool = False, overwrite: bool = False, stop_after: int | None = None
    ) -> TrainResult:
        """Train to ``config.train.max_steps``.

        Args:
            resume: continue from ``RUN_DIR/checkpoints/last.pt``; ``metrics.csv`` keeps its
                rows up to the resumed step (rows logged after that checkpoint by the
                interrupted run are dropped, so no step appears twice).
            overwrite: start afresh in a run folder that already holds a trained run
                (without it, or ``resume``, such a folder is refused).
            stop_after: stop after this step as if the job were killed there (no final
                save; what survives is the last periodic checkpoint). For tests and
                time-boxed jobs.

        Raises:
            OutputError: the run folder holds a trained run and neither ``resume`` nor
                ``overwrite`` is set; or it cannot be created.
        """
        c = self.config.train
        t_start = time.perf_counter()
        check_run_folder(self.run_dir, resume=resume, overwrite=overwrite)
        if self.info.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(
                    f"{self.run_dir}: cannot create the run folder ({exc.strerror})"
                ) from None
        barrier(self.info)
        start = self.load_checkpoint() if resume else 0
        if self.info.is_main:
            from medidiff.io import write_text_atomic

            write_text_atomic(self.run_dir / "config.yaml", self.config.to_yaml())
        if self.info.is_main:  # measured now, not at the first save: a problem shows at once
            getattr(self.dataset, "input_profile", None)
        logger = (_Logger(self.run_dir, resumed_from=start if resume else None)
                  if self.info.is_main else None)
        bar = None
        if self.progress:
            from medidiff.runtime.progress import Progress

            # a bar on a terminal; in a log one line every $MEDIDIFF_LOG_EVERY s (default 30)
            bar = Progress(c.max_steps, "train", unit="step", initial=start)
        self.model.train()
        loss_value = float("nan")
        batches = self._batches(start)
        last_log, last_log_step = time.perf_counter(), start
        try:
            while self.step < c.max_steps:
                batch = next(batches)
                loss_value, grad_norm = self.train_step(batch)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if logger is not None and (self.step % max(1, c.log_every) == 0 or self.step == c.max_steps):
                    now = time.perf_counter()
                    done = (self.step - last_log_step) * c.batch_size * self.info.world_size
                    logger.log(self.step, loss_value, self.scheduler.get_last_lr()[0], grad_norm,
                               now - t_start, done / max(now - last_log, 1e-9))
                    last_log, last_log_step = now, self.step
                if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < c.max_steps:
                    self.save_checkpoint()
                if c.preview_every and self.step % c.preview_every == 0:
                    self.preview()
                    self.model.train()
                if stop_after is not None and self.step >= stop_after:
                    break
            else:
                self.save_checkpoint()
            barrier(self.info)
        finally:
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()
        return TrainResult(
            run_dir=self.run_dir, model_path=self.run_dir / "model.safetensors", steps=self.step,
            final_loss=loss_value, seconds=time.perf_counter() - t_start, resumed_from=start,
        )


def resolve_config_checkpoint(value: str, config_dir: Path | None) -> Path:
    """A checkpoint named in a config (``init.checkpoint``, ``base.checkpoint``): a shipped
    model's name, a path relative to the config's folder (when it exists there), or a path
    as given.

    Raises:
        CheckpointError: the file does not exist.
    """
    from medidiff.models.pretrained import MODELS, pretrained_path

    if value in MODELS:
        return pretrained_path(value)
    path = Path(os.path.expanduser(value))
    if config_dir is not None and not path.is_absolute() and (config_dir / path).exists():
        path = config_dir / path
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint named in the config not found")
    return path


def _adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with the fused kernel where this torch build has one for the device (one
    kernel per step instead of several foreach passes), else the foreach implementation."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def _collate(items: list) -> dict:
    """Batch plain tensors or dicts with ``image`` (and optional ``class_label``)."""
    if isinstance(items[0], dict):
        out = {"image": torch.stack([torch.as_tensor(i["image"]) for i in items]).float()}
        if items[0].get("class_label") is not None:
            out["class_label"] = torch.as_tensor([int(i["class_label"]) for i in items])
        if items[0].get("condition") is not None:
            out["condition"] = torch.stack([torch.as_tensor(i["condition"]) for i in items]).float()
        return out
    return {"image": torch.stack([torch.as_tensor(i) for i in items]).float()}


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the rows of ``metrics.csv`` up to ``last_step`` (the resumed checkpoint's step).

    An interrupted run logs steps after its last checkpoint; the resumed run trains those
    steps again, so their old rows are dropped (atomically) instead of appearing twice.
    """
    from medidiff.io import write_text_atomic

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]]
    for row in rows[1:]:
        try:
            if row and int(row[0]) <= last_step:
                kept.append(row)
        except ValueError:  # not a step number: keep it rather than lose data
            kept.append(row)
    if len(kept) == len(rows):
        return
    import io

    buffer = io.StringIO()
    csv.writer(buffer).writerows(kept)
    write_text_atomic(path, buffer.getvalue())


class _Logger:
    """metrics.csv plus TensorBoard scalars (rank 0)."""

    def __init__(self, run_dir: Path, resumed_from: int | None) -> None:
        path = run_dir / "metrics.csv"
        keep = resumed_from is not None and resumed_from > 0 and path.exists()
        if keep:
            _truncate_metrics(path, resumed_from)
        self.file = open(path, "a" if keep else "w", newline="", encoding="utf-8")
        self.csv = csv.writer(self.file)
        if not keep:
            self.csv.writerow(METRICS_FIELDS)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the interrupted run's events after the checkpoint
            purge = resumed_from + 1 if keep else None
            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge)
        except Exception:  # tensorboard missing: metrics.csv still has everything
            self.tb = None

    def log(self, step: int, loss: float, lr: float, grad_norm: float, seconds: float, sps: float) -> None:
        self.csv.writerow([step, f"{loss:.6g}", f"{lr:.6g}", f"{grad_norm:.6g}", f"{seconds:.3f}", f"{sps:.3f}"])
        self.file.flush()
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/grad_norm", grad_norm, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
