"""Checkpoints that never execute code on load.

Two kinds of file:

* **Inference weights** (``model.safetensors``): the model's state dict in the
  `safetensors <https://huggingface.co/docs/safetensors>`_ format, which holds raw tensor
  bytes and a JSON header, nothing executable. The header's string metadata carries, as
  JSON, everything needed to use the weights: the ``DiffusionModelUNet`` constructor kwargs
  (:func:`medidiff.models.unet.model_kwargs`), the resolved training config, the preprocessing
  the model expects, and the medidiff version. Written by :func:`save_inference`, read by
  :func:`load_inference` and :func:`build_model_from_checkpoint`.
* **Resumable training state** (``checkpoints/*.pt``): model, EMA, optimizer and
  GradScaler state dicts, step, config and RNG states, written with ``torch.save`` and read
  with ``torch.load(weights_only=True)``, whose restricted unpickler builds only tensors and
  plain containers and refuses every other Python object: see
  :mod:`medidiff.models.training_state`.

No load path in this module calls an unrestricted unpickler. Pickle files given where
weights are expected are recognised by their first bytes and refused unread.

All writes go to a temporary file in the destination folder, then ``os.replace``, so a
crash never leaves a half-written checkpoint under the final name.

Example:
    >>> import tempfile, pathlib
    >>> from medidiff.models.unet import build_model, model_kwargs
    >>> from medidiff.models.checkpoint import save_inference, load_inference
    >>> kwargs = model_kwargs(2, "tiny")
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> _ = save_inference(path, build_model(2, "tiny"), model_kwargs=kwargs,
    ...                    config={"train": {"max_steps": 10}}, preprocessing={"modality": "mri"})
    >>> load_inference(path).preprocessing
    {'modality': 'mri'}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import medidiff
from medidiff.errors import CheckpointError, ConfigError
from medidiff.io.atomic import atomic_write, json_default

__all__ = [
    "INFERENCE_FORMAT",
    "InferenceCheckpoint",
    "save_inference",
    "load_inference",
    "build_model_from_checkpoint",
    "build_network",
    "checkpoint_network",
    "load_state_dict_checked",
    "file_sha256",
    "replace_extra",
    "tensors_sha256",
]

INFERENCE_FORMAT = "medidiff-inference-1"

_PICKLE_HINT = (
    "medidiff never unpickles weights; save them with medidiff.models.checkpoint.save_inference "
    "(or `medidiff train`), which writes safetensors"
)


@dataclass(frozen=True, eq=False)
class InferenceCheckpoint:
    """The content of a medidiff inference weights file.

    Attributes:
        path: the file read.
        state_dict: parameter and buffer tensors by name (floating tensors as float32,
            whatever precision was stored).
        model_kwargs: ``DiffusionModelUNet`` constructor kwargs.
        config: the resolved training config (nested dict).
        preprocessing: what the model expects of its input (modality, spacing, shape,
            intensity scheme, orientation, ...); an opaque JSON dict here.
        extra: any other JSON written by the saver (e.g. EMA decay, training step).
        version: the medidiff version that wrote the file.
        sha256: hex SHA-256 of the file's bytes; ties e.g. anomaly thresholds to these
            exact weights.
        stored_dtype: ``"float16"`` when saved with ``half=True``, else ``"float32"``.
        tensors_sha256: hex SHA-256 over the tensors only (see :func:`tensors_sha256`): the
            same for two files holding the same weights with different metadata, e.g. after
            :func:`replace_extra` added an input profile.
        network: which MONAI network ``model_kwargs`` build (a key of
            :data:`NETWORK_BUILDERS`: ``diffusion_unet``, ``autoencoder_kl``,
            ``autoencoder_vq`` or ``latent_diffusion``, the U-Net and autoencoder of a
            latent model); files
            written before networks were named hold diffusion U-Nets.
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    model_kwargs: dict[str, Any]
    config: dict[str, Any]
    preprocessing: dict[str, Any]
    extra: dict[str, Any]
    version: str
    sha256: str
    stored_dtype: str
    network: str = "diffusion_unet"
    tensors_sha256: str = ""


def _build_diffusion_unet(kwargs: Mapping[str, Any]) -> nn.Module:
    from medidiff.models.unet import build_model_from_kwargs

    return build_model_from_kwargs(kwargs)


def _build_autoencoder_kl(kwargs: Mapping[str, Any]) -> nn.Module:
    from medidiff.models.autoencoder import build_autoencoder

    return build_autoencoder(kwargs, "kl")


def _build_autoencoder_vq(kwargs: Mapping[str, Any]) -> nn.Module:
    from medidiff.models.autoencoder import build_autoencoder

    return build_autoencoder(kwargs, "vq")


def _build_latent_diffusion(kwargs: Mapping[str, Any]) -> nn.Module:
    from medidiff.models.latent import build_latent_network

    return build_latent_network(kwargs)


def _build_controlled_diffusion(kwargs: Mapping[str, Any]) -> nn.Module:
    from medidiff.models.controlnet import build_controlled_network

    return build_controlled_network(kwargs)


NETWORK_BUILDERS = {
    "diffusion_unet": _build_diffusion_unet,
    "controlled_diffusion": _build_controlled_diffusion,
    "autoencoder_kl": _build_autoencoder_kl,
    "autoencoder_vq": _build_autoencoder_vq,
    "latent_diffusion": _build_latent_diffusion,
}
"""The networks an inference file may hold, by the name stored in its metadata."""


def build_network_from_kwargs(network: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Build the named network (a key of :data:`NETWORK_BUILDERS`) from its stored kwargs.

    Raises:
        ConfigError: an unknown network name, or kwargs the builder refuses.
    """
    if network not in NETWORK_BUILDERS:
        raise ConfigError(f"unknown network {network!r}; known: {', '.join(sorted(NETWORK_BUILDERS))}")
    return NETWORK_BUILDERS[network](kwargs)


# ------------------------------------------------------------------ inference weights


def save_inference(
    path: str | os.PathLike,
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    *,
    model_kwargs: Mapping[str, Any],
    config: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    half: bool = False,
    network: str = "diffusion_unet",
) -> Path:
    """Write inference weights and their metadata as a safetensors file, atomically.

    Args:
        path: destination, conventionally ``RUN_DIR/model.safetensors``; its folder is
            created if missing; an existing file is replaced.
        model_or_state_dict: the model (unwrapped from DDP / ``torch.compile`` if needed) or
            its state dict. Pass the EMA model where one is used.
        model_kwargs: the constructor kwargs from :func:`medidiff.models.unet.model_kwargs`.
        config: the resolved training config as a dict (a dataclass is converted).
        preprocessing: what the model expects of its input, e.g. ``{"modality": "mri",
            "spacing": [1.0, 1.0, 1.0], "shape": [96, 96], "orientation": "RAS",
            "intensity": "percentile-1-99"}``; stored as given.
        extra: further JSON to keep with the weights (training step, EMA decay, ...).
        half: store floating tensors as float16 (half the size; for shipping small
            default models); otherwise they are stored as float32.
            :func:`load_inference` returns float32 either way.
        network: the network ``model_kwargs`` build (a key of :data:`NETWORK_BUILDERS`).

    Returns:
        The path written.

    Raises:
        CheckpointError: ``model_kwargs`` do not describe the weights (checked by building
            the architecture on the meta device, which allocates nothing), a metadata value
            is not JSON-serialisable, or the state dict is empty or holds non-tensors.
        OutputError: the folder cannot be created or written.
    """
    path = Path(path)
    state_dict = _state_dict_of(model_or_state_dict)
    if not state_dict:
        raise CheckpointError(f"{path}: nothing to save, the state dict is empty")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: state dict entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        tensor = value.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float16 if half else torch.float32)
        # clone(): safetensors refuses tensors that share storage.
        tensors[key] = tensor.contiguous().clone()
    _check_kwargs_describe_weights(path, model_kwargs, tensors, network)

    metadata = {
        "format": INFERENCE_FORMAT,
        "medidiff_version": medidiff.__version__,
        "torch_version": torch.__version__,
        "monai_version": _monai_version(),
        "stored_dtype": "float16" if half else "float32",
        "network": network,
        "model_kwargs": _to_json(model_kwargs, "model_kwargs", path),
        "config": _to_json(config, "config", path),
        "preprocessing": _to_json(preprocessing, "preprocessing", path),
        "extra": _to_json(extra if extra is not None else {}, "extra", path),
    }

    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def load_inference(path: str | os.PathLike) -> InferenceCheckpoint:
    """Read a medidiff inference weights file without executing anything in it.

    Args:
        path: a file written by :func:`save_inference`.

    Returns:
        The :class:`InferenceCheckpoint`; floating tensors are float32.

    Raises:
        CheckpointError: the file is missing, empty, truncated or corrupt, is a pickle /
            ``torch.save`` file, lacks medidiff metadata, was written by a newer medidiff
            format, or holds NaN/Inf weights.
    """
    path = Path(path)
    data = _read_bytes(path)
    metadata = _medidiff_metadata(path, data)
    fields = _metadata_fields(path, metadata)
    return InferenceCheckpoint(
        path=path,
        state_dict=_finite_float32_tensors(path, data),
        model_kwargs=fields["model_kwargs"],
        config=fields["config"],
        preprocessing=fields["preprocessing"],
        extra=fields["extra"],
        version=str(metadata.get("medidiff_version", "unknown")),
        sha256=hashlib.sha256(data).hexdigest(),
        stored_dtype=str(metadata.get("stored_dtype", "float32")),
        network=_network_name(path, metadata),
        tensors_sha256=_tensors_digest(data),
    )


def replace_extra(path: str | os.PathLike, extra: Mapping[str, Any]) -> Path:
    """Replace the ``extra`` record of an inference file in place, leaving every tensor byte
    as it is (e.g. to add an input profile to a shipped model without re-saving its weights).

    Only the JSON header is rewritten (padded with spaces to 8 bytes, as safetensors does);
    the data section is copied unchanged, so :func:`tensors_sha256` stays the same while the
    file's own SHA-256 changes. Atomic.

    Raises:
        CheckpointError: not a medidiff inference file, or ``extra`` is not JSON.
    """
    path = Path(path)
    data = _read_bytes(path)
    _medidiff_metadata(path, data)  # refuses anything that is not ours
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size].decode("utf-8"))
    header["__metadata__"]["extra"] = _to_json(extra, "extra", path)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    body = data[8 + size :]
    atomic_write(path, lambda tmp: tmp.write_bytes(len(text).to_bytes(8, "little") + text + body))
    return path


def tensors_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 over an inference file's tensors (name, dtype, shape and bytes, in name
    order), whatever its metadata: the identity of the weights themselves."""
    path = Path(path)
    data = _read_bytes(path)
    _medidiff_metadata(path, data)
    return _tensors_digest(data)


def _tensors_digest(data: bytes) -> str:
    """:func:`tensors_sha256` of a file's bytes already read and checked."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size].decode("utf-8"))
    body = memoryview(data)[8 + size :]
    digest = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        start, end = entry["data_offsets"]
        digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode("utf-8"))
        digest.update(body[start:end])
    return digest.hexdigest()


def checkpoint_network(path: str | os.PathLike) -> str:
    """The network an inference file holds, read from its header only (no weights).

    Raises:
        CheckpointError: the file cannot be read or is not medidiff safetensors.
    """
    path = Path(path)
    return _network_name(path, _header_metadata(path))


def checkpoint_extra(path: str | os.PathLike) -> dict[str, Any]:
    """The ``extra`` record of an inference file (training step, input profile, tuned
    anomaly post-processing, ...), read from its header only (no weights).

    Raises:
        CheckpointError: the file cannot be read or is not medidiff safetensors.
    """
    path = Path(path)
    return _metadata_fields(path, _header_metadata(path))["extra"]


def _header_metadata(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = f.read(size) if 0 < size < 100_000_000 else b""
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from None
    return _medidiff_metadata(path, head + header)


def _network_name(path: Path, metadata: Mapping[str, Any]) -> str:
    network = str(metadata.get("network", "diffusion_unet"))
    if network not in NETWORK_BUILDERS:
        raise CheckpointError(
            f"{path}: holds a {network!r} network, which this medidiff version cannot build "
            f"(known: {', '.join(sorted(NETWORK_BUILDERS))}); upgrade medidiff"
        )
    return network


def _medidiff_metadata(path: Path, data: bytes) -> dict[str, Any]:
    """The medidiff metadata of a safetensors file's header; refuses pickles, foreign
    files and newer formats by name."""
    kind = _sniff(data)
    if kind == "torch-zip":
        raise CheckpointError(
            f"{path}: is a PyTorch torch.save (zip/pickle) file, not medidiff safetensors "
            f"weights; {_PICKLE_HINT} (training state is resumed with `medidiff train --resume`)"
        )
    if kind == "pickle":
        raise CheckpointError(f"{path}: is a Python pickle file, refused unread; {_PICKLE_HINT}")
    if kind != "safetensors":
        raise CheckpointError(
            f"{path}: is not a safetensors file (or its header is corrupt or truncated)"
        )

    header_len = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or "format" not in metadata:
        raise CheckpointError(
            f"{path}: safetensors file without medidiff metadata (not written by "
            "medidiff save_inference), so the model architecture is unknown; re-export it "
            "with medidiff.models.checkpoint.save_inference(..., model_kwargs=...)"
        )
    _check_format(path, metadata["format"], INFERENCE_FORMAT, metadata.get("medidiff_version"))
    return metadata


def _metadata_fields(path: Path, metadata: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The JSON objects ``model_kwargs``, ``config``, ``preprocessing`` and ``extra``."""
    fields: dict[str, dict[str, Any]] = {}
    for key in ("model_kwargs", "config", "preprocessing", "extra"):
        if key not in metadata:
            raise CheckpointError(f"{path}: medidiff metadata lacks {key!r}; the file is damaged")
        try:
            value = json.loads(metadata[key])
        except (TypeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: medidiff metadata {key!r} is not valid JSON") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: medidiff metadata {key!r} is not a JSON object")
        fields[key] = value
    return fields


def _finite_float32_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    """The file's tensors, half precision widened to float32; refuses NaN/Inf weights."""
    from safetensors.torch import load as load_safetensors_bytes

    try:
        raw = load_safetensors_bytes(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise CheckpointError(
            f"{path}: corrupt or truncated safetensors data ({_first_line(exc)})"
        ) from None

    state_dict: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.to(torch.float32)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{path}: weight {key!r} contains NaN or Inf; the model diverged before it "
                "was saved, use an earlier checkpoint"
            )
        state_dict[key] = tensor
    return state_dict


def build_network(checkpoint: InferenceCheckpoint, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network an inference checkpoint describes and load its weights.

    Only the network: :func:`medidiff.models.loaded.load_model` builds the whole typed
    :class:`~medidiff.models.loaded.LoadedModel` (schedule, noise, preprocessing, ...).

    Args:
        checkpoint: a loaded checkpoint (see :func:`load_inference`).
        device: where to put the model; on CUDA flash attention is switched on.

    Returns:
        The network (``DiffusionModelUNet``, ``AutoencoderKL`` or a
        :class:`~medidiff.models.latent.LatentDiffusionNetwork`, as the file names) in eval
        mode on ``device``.

    Raises:
        CheckpointError: the stored model kwargs are invalid, or the weights do not fit
            the architecture.
    """
    from medidiff.models.unet import enable_flash_attention

    try:
        model = build_network_from_kwargs(checkpoint.network, checkpoint.model_kwargs)
    except ConfigError as exc:
        raise CheckpointError(
            f"{checkpoint.path}: stored model_kwargs are invalid: {exc}"
        ) from None
    except (TypeError, ValueError) as exc:  # MONAI's own checks
        raise CheckpointError(
            f"{checkpoint.path}: MONAI cannot build the stored model: {_first_line(exc)}"
        ) from None
    load_state_dict_checked(model, checkpoint.state_dict, source=str(checkpoint.path))
    model = model.to(device)
    if checkpoint.network in ("diffusion_unet", "latent_diffusion", "controlled_diffusion"):
        enable_flash_attention(model, device)
    model.eval()
    return model


def build_model_from_checkpoint(
    path_or_checkpoint: str | os.PathLike | InferenceCheckpoint,
    device: str | torch.device = "cpu",
) -> Any:
    """The same as :func:`medidiff.models.loaded.load_model` (kept for scripts)."""
    from medidiff.models.loaded import load_model

    return load_model(path_or_checkpoint, device)


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """Load a state dict strictly, failing with a message that names every kind of mismatch.

    Args:
        model: the model to load into (unchanged if the check fails).
        state_dict: tensors by name.
        source: where the weights came from (a file name), for the message.

    Raises:
        CheckpointError: one line naming missing keys, unexpected keys and shape mismatches
            (``key: model expects (a, b), file has (c, d)``), the first few of each with
            their counts.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: model expects {tuple(expected[k].shape)}, file has {tuple(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                shown = "; ".join(items[:3]) + ("; ..." if len(items) > 3 else "")
                parts.append(f"{len(items)} {label} ({shown})")
        hint = "the checkpoint was made for a different architecture (preset or overrides)"
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = "the keys carry a 'module.' prefix: save model.module, not the DDP wrapper"
        raise CheckpointError(
            f"{source}: weights do not match the model: {', '.join(parts)}; {hint}"
        )
    model.load_state_dict(dict(state_dict), strict=True)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks.

    Args:
        path: the file.

    Returns:
        64 lowercase hex digits.

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


# ---------------------------------------------------------------------------- helpers


def _state_dict_of(obj: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The state dict of a model (unwrapping DDP and torch.compile) or a mapping as is."""
    if isinstance(obj, nn.Module):
        while True:
            if isinstance(obj, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
                obj = obj.module
            elif hasattr(obj, "_orig_mod") and isinstance(obj._orig_mod, nn.Module):
                obj = obj._orig_mod  # torch.compile wrapper
            else:
                break
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise CheckpointError(
        f"expected a model or a state dict to save, got {type(obj).__name__}"
    )


def _check_kwargs_describe_weights(
    path: Path, kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], network: str
) -> None:
    """Refuse to write weights that the stored kwargs could not rebuild into a model."""
    try:
        with torch.device("meta"):  # shapes only, no memory, no initialisation cost
            skeleton = build_network_from_kwargs(network, kwargs)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: model_kwargs are invalid: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: MONAI cannot build model_kwargs: {_first_line(exc)}"
        ) from None
    expected = skeleton.state_dict()
    if set(expected) != set(state_dict) or any(
        tuple(expected[k].shape) != tuple(state_dict[k].shape) for k in expected
    ):
        try:
            load_state_dict_checked(skeleton, state_dict, source=f"{path}: model_kwargs")
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc} (the kwargs passed to save_inference do not describe these weights)"
            ) from None


def _to_json(value: Any, name: str, path: Path) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{path}: {name} must be a dict, got {type(value).__name__}")
    try:
        return json.dumps(dict(value), sort_keys=True, allow_nan=False, default=json_default)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: {name} cannot be stored as JSON ({exc}); use plain numbers, strings, "
            "lists and dicts"
        ) from None


def _monai_version() -> str:
    try:
        import monai

        return str(monai.__version__)
    except ImportError:  # pragma: no cover - monai is a hard dependency
        return "unknown"


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a file; give the .safetensors weights file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data:
        raise CheckpointError(f"{path}: checkpoint is empty (0 bytes)")
    return data


def _sniff(head: bytes, size: int | None = None) -> str:
    """Classify a file by its first bytes: safetensors, torch-zip, pickle or unknown.

    A safetensors file starts with an 8-byte little-endian header length N followed by a
    JSON object of N bytes; ``torch.save`` writes a zip archive (``PK\\x03\\x04``) and older
    torch and ``pickle`` write a pickle stream opening with the PROTO opcode ``\\x80``.
    """
    size = len(head) if size is None else size
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    # safetensors first: its 8-byte length may itself start with 0x80 (e.g. a 12160-byte
    # header), which must not be mistaken for pickle's PROTO opcode.
    if len(head) >= 9 and size >= 8:
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _check_format(path: Path, found: Any, expected: str, version: Any) -> None:
    """Accept ``expected``; name a newer revision or a foreign format in the error."""
    if found == expected:
        return
    stem, _, revision = expected.rpartition("-")
    if isinstance(found, str) and found.startswith(stem + "-"):
        tail = found[len(stem) + 1 :]
        if tail.isdigit() and int(tail) > int(revision):
            raise CheckpointError(
                f"{path}: written by a newer medidiff ({version}, format {found}); this is "
                f"medidiff {medidiff.__version__} (reads {expected}): upgrade medidiff"
            )
    raise CheckpointError(f"{path}: unknown checkpoint format {found!r}; expected {expected}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
