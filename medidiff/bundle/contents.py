"""What the files of an exported bundle say.

One :class:`BundleSpec` (the resolved detector settings, the checkpoint's records, the
thresholds and the bundle's name) renders every text file of the bundle:

- :func:`metadata` -> ``configs/metadata.json``: the keys of MONAI's bundle specification
  (``version``, ``monai_version``, ``pytorch_version``, ``numpy_version``,
  ``required_packages_version``, ``task``, ``description``, ``authors``, ``copyright``,
  ``network_data_format`` of the network in ``models/model.pt`` ...), plus
  ``anomaly_data_format`` (the workflow's files) and ``medidiff`` (checkpoint SHA-256,
  preprocessing, method, post-processing, seed, thresholds, the equivalent command);
- :func:`inference_config` -> ``configs/inference.json``: MONAI config syntax (``_target_``,
  ``@`` references, ``$`` expressions) with the ids MONAI's inference properties ask for
  (``bundle_root``, ``device``, ``dataset_dir``, ``dataset``, ``network_def``, ``inferer``,
  ``evaluator``) and ``run``;
- :func:`readme`, :func:`license_text`, :data:`LOGGING_CONF`;
- :func:`anomaly_command`: the ``medidiff anomaly`` command line that makes the same maps.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LOGGING_CONF",
    "BundleSpec",
    "anomaly_command",
    "inference_config",
    "license_text",
    "metadata",
    "readme",
]

#: MONAI's model-zoo metadata schema (only named here: nothing is downloaded; run
#: ``python -m monai.bundle verify_metadata`` online to check a bundle against it)
SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
    "meta_schema_20240725.json"
)

#: ``configs/logging.conf``: INFO to stdout (only ``logging`` classes and ``sys.stdout``,
#: which MONAI's check of logging files allows)
LOGGING_CONF = """\
[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

_REFERENCES = {
    "diffusion": "Ho J, Jain A, Abbeel P. Denoising Diffusion Probabilistic Models. NeurIPS 2020.",
    "anoddpm": "Wyatt J, Leach A, Schmon SM, Willcocks CG. AnoDDPM: Anomaly Detection with Denoising "
    "Diffusion Probabilistic Models using Simplex Noise. CVPR Workshops 2022.",
    "ddim": "Song J, Meng C, Ermon S. Denoising Diffusion Implicit Models. ICLR 2021.",
    "patched": "Behrendt F, Bhattacharya D, Krueger J, Opfer R, Schlaefer A. Patched Diffusion Models "
    "for Unsupervised Anomaly Detection in Brain MRI. MIDL 2023.",
    "ensemble": "Behrendt F, Bhattacharya D, Mieling R, Maack L, Krueger J, Opfer R, Schlaefer A. "
    "Guided Reconstruction with Conditioned Diffusion Models for Unsupervised Anomaly Detection "
    "in Brain MRIs. Computers in Biology and Medicine, 2025.",
    "flow": "Liu X, Gong C, Liu Q. Flow Straight and Fast: Learning to Generate and Transfer Data "
    "with Rectified Flow. ICLR 2023.",
    "latent": "Rombach R, Blattmann A, Lorenz D, Esser P, Ommer B. High-Resolution Image Synthesis "
    "with Latent Diffusion Models. CVPR 2022.",
    "monai": "Pinaya WHL, Graham MS, Kerfoot E, et al. Generative AI for Medical Imaging: extending "
    "the MONAI Framework. arXiv:2307.15208, 2023.",
}

_PREDICTIONS = {
    "epsilon": "predicted noise eps_theta(x_t, t)",
    "v_prediction": "predicted velocity v_theta(x_t, t)",
    "sample": "predicted clean image x_0",
    "flow": "predicted rectified-flow velocity",
}


@dataclass(frozen=True)
class BundleSpec:
    """Everything the bundle's text files are rendered from.

    Attributes:
        name: the bundle's folder name (also its ``name`` in the metadata, with a prefix).
        version: the bundle's version.
        checkpoint_source: the checkpoint as the user named it (informative).
        sha256: SHA-256 of ``models/model.safetensors`` (the checkpoint's bytes).
        network: the checkpoint's network (``diffusion_unet`` or ``latent_diffusion``).
        model_kwargs: its MONAI constructor kwargs (a latent model's: ``unet``,
            ``autoencoder``, ``autoencoder_kind``).
        stored_dtype: ``float16`` or ``float32``.
        config: the checkpoint's resolved training config.
        preprocessing: the model grid (spacing, shape, modality, intensity scheme).
        step: the training step of the weights, if recorded.
        spatial_dims: 2 (slices) or 3 (volumes).
        input_shape: the network's spatial input (a slice, a volume or a latent).
        method: the resolved method settings (``MethodConfig.to_dict()``).
        postprocess: the post-processing settings.
        seed: the noise seed.
        batch_size: network inputs per call.
        overlays: whether the workflow draws overlays.
        thresholds: the thresholds file's content, or ``None``.
        medidiff_version: the exporting medidiff.
        packages: versions of MONAI, torch, numpy and the packages a run needs.
        model_card: a shipped model's card (markdown), if any.
        card_facts: a shipped model's facts (``medidiff/weights/<name>.json``), if any.
        authors: who made the weights.
        license: the weights' terms (text), or ``None``.
    """

    name: str
    version: str
    checkpoint_source: str
    sha256: str
    network: str
    model_kwargs: Mapping[str, Any]
    stored_dtype: str
    config: Mapping[str, Any]
    preprocessing: Mapping[str, Any]
    step: int | None
    spatial_dims: int
    input_shape: tuple[int, ...]
    method: Mapping[str, Any]
    postprocess: Mapping[str, Any]
    seed: int
    batch_size: int
    overlays: bool
    thresholds: Mapping[str, Any] | None
    medidiff_version: str
    packages: Mapping[str, str] = field(default_factory=dict)
    model_card: str | None = None
    card_facts: Mapping[str, Any] = field(default_factory=dict)
    authors: str = "unknown"
    license: str | None = None

    @property
    def latent(self) -> bool:
        """Whether the model diffuses an autoencoder's latent."""
        return self.network == "latent_diffusion"

    @property
    def unet_kwargs(self) -> dict[str, Any]:
        """The ``DiffusionModelUNet`` kwargs (the latent U-Net's for a latent model)."""
        return dict(self.model_kwargs["unet"] if self.latent else self.model_kwargs)

    @property
    def modality(self) -> str:
        """``MR`` or ``CT`` (MONAI's modality names)."""
        return "CT" if str(self.preprocessing.get("modality", "mri")).lower() == "ct" else "MR"

    @property
    def diffusion(self) -> Mapping[str, Any]:
        return self.config.get("diffusion") or {}


# --------------------------------------------------------------------------------------------
# the equivalent medidiff command
# --------------------------------------------------------------------------------------------


def anomaly_command(
    spec: BundleSpec,
    *,
    checkpoint: str = "models/model.safetensors",
    inputs: str = "INPUTS",
    out: str = "OUT_DIR",
    thresholds: str | None = "models/thresholds.json",
) -> list[str]:
    """The ``medidiff anomaly`` arguments that score exactly as the bundle does.

    Every resolved setting is spelled out (method, steps, sampler, noise, post-processing,
    seed), so the command does not depend on medidiff's defaults.
    """
    m, p = spec.method, spec.postprocess
    args = ["medidiff", "anomaly", "--checkpoint", checkpoint, "--input", inputs, "--out", out,
            "--method", str(m["method"])]
    if m["method"] == "ensemble":
        args += ["--t-starts", *[str(t) for t in m["t_starts"]]]
    elif m.get("t_start") is not None:
        args += ["--t-start", str(m["t_start"])]
    args += ["--steps", str(m["steps"]), "--sampler", str(m["sampler"]), "--noise", str(m["noise"]),
             "--eta", repr(float(m["eta"]))]
    if not m["clip"]:
        args.append("--no-clip")
    for key, flag in (("patch_size", "--patch-size"), ("patch_stride", "--patch-stride")):
        if m.get(key):
            args += [flag, *[str(v) for v in m[key]]]
    args += ["--window-overlap", repr(float(m["window_overlap"])),
             "--residual", str(p["residual"]), "--erode", str(p["erode"]),
             "--median-size", str(p["median_size"]), "--min-component", str(p["min_component"]),
             "--top-fraction", repr(float(p["top_fraction"])),
             "--batch-size", str(spec.batch_size), "--seed", str(spec.seed)]
    if thresholds is not None and spec.thresholds is not None:
        args += ["--thresholds", thresholds]
    if not spec.overlays:
        args.append("--no-overlay")
    return args


# --------------------------------------------------------------------------------------------
# configs/inference.json
# --------------------------------------------------------------------------------------------


def _autoencoder_target(kind: str) -> str:
    return "monai.networks.nets.VQVAE" if kind == "vq" else "monai.networks.nets.AutoencoderKL"


def inference_config(spec: BundleSpec) -> dict[str, Any]:
    """``configs/inference.json``.

    ``run`` scores ``dataset_dir`` into ``output_dir`` with the medidiff detector of the
    bundle's weights; ``network_def`` (+ ``autoencoder_def``) rebuild the bare MONAI networks
    of ``models/model.pt`` (+ ``model_autoencoder.pt``) for tools that want the network only.
    """
    load = "$@{0}.load_state_dict(torch.load(@{1}, map_location='cpu', weights_only=True))"
    config: dict[str, Any] = {
        "imports": ["$import medidiff"],
        "bundle_root": ".",
        "model_dir": "$@bundle_root + '/models'",
        "checkpoint": "$@model_dir + '/model.safetensors'",
        "dataset_dir": None,
        "split": None,
        "masks": None,
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        "overlays": spec.overlays,
        "overwrite": False,
        "thresholds_path": "$@model_dir + '/thresholds.json'" if spec.thresholds else None,
        "thresholds": {
            "_target_": "medidiff.anomaly.thresholds.Thresholds.load",
            "_disabled_": "$@thresholds_path is None",
            "path": "@thresholds_path",
        },
        "method": {"_target_": "medidiff.anomaly.methods.MethodConfig", **dict(spec.method)},
        "postprocess": {
            "_target_": "medidiff.anomaly.postprocess.PostprocessConfig", **dict(spec.postprocess)
        },
        "ckpt_path": "$@model_dir + '/model.pt'",
        "network_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", **spec.unet_kwargs},
        "load_network": load.format("network_def", "ckpt_path"),
    }
    if spec.latent:
        config["autoencoder_ckpt_path"] = "$@model_dir + '/model_autoencoder.pt'"
        config["autoencoder_def"] = {
            "_target_": _autoencoder_target(str(spec.model_kwargs.get("autoencoder_kind", "kl"))),
            **dict(spec.model_kwargs["autoencoder"]),
        }
        config["load_autoencoder"] = load.format("autoencoder_def", "autoencoder_ckpt_path")
    config.update({
        "inferer": {
            "_target_": "medidiff.anomaly.detector.AnomalyDetector",
            "checkpoint": "@checkpoint",
            "method": "@method",
            "postprocess": "@postprocess",
            "device": "@device",
            "batch_size": "@batch_size",
            "seed": "@seed",
        },
        "dataset": {
            "_target_": "medidiff.bundle.inference.load_inputs",
            "dataset_dir": "@dataset_dir",
            "split": "@split",
            "masks": "@masks",
        },
        "evaluator": {
            "_target_": "medidiff.bundle.inference.AnomalyEvaluator",
            "detector": "@inferer",
            "dataset": "@dataset",
            "output_dir": "@output_dir",
            "thresholds": "@thresholds",
            "thresholds_path": "@thresholds_path",
            "overlays": "@overlays",
            "overwrite": "@overwrite",
        },
        "run": ["$@evaluator.run()"],
    })
    return config


# --------------------------------------------------------------------------------------------
# configs/metadata.json
# --------------------------------------------------------------------------------------------


def _tensor(type_: str, fmt: str, channels: int, shape: Sequence[Any], dtype: str,
            value_range: Sequence[float], patch: bool, channel_def: Mapping[str, str],
            modality: str | None = None) -> dict[str, Any]:
    """A MONAI tensor format specifier."""
    out: dict[str, Any] = {"type": type_, "format": fmt}
    if modality is not None:
        out["modality"] = modality
    out.update({"num_channels": channels, "spatial_shape": list(shape), "dtype": dtype,
                "value_range": list(value_range), "is_patch_data": patch,
                "channel_def": dict(channel_def)})
    return out


def _network_data_format(spec: BundleSpec) -> dict[str, Any]:
    """The tensors of the network in ``models/model.pt`` (the U-Net; a latent one's latents)."""
    unet = spec.unet_kwargs
    grid = list(spec.preprocessing.get("shape") or [])
    name = "latent" if spec.latent else "image"
    patch = spec.spatial_dims == 2 or (not spec.latent and list(spec.input_shape) != grid)
    T = int(spec.diffusion.get("num_train_timesteps", 1000))
    what = _PREDICTIONS.get(str(spec.diffusion.get("prediction_type", "epsilon")), "prediction")
    x_t = "noised latent z_t" if spec.latent else "noised image x_t (intensities of x_0 in [0, 1])"
    return {
        "inputs": {
            name: _tensor("image", "latent" if spec.latent else "magnitude",
                          int(unet["in_channels"]), spec.input_shape, "float32", [], patch,
                          {str(c): x_t for c in range(int(unet["in_channels"]))},
                          modality=spec.modality),
            "timesteps": _tensor("timesteps", "timesteps", 1, [], "long", [0, T - 1], False,
                                 {"0": "diffusion timestep t"}),
        },
        "outputs": {
            "pred": _tensor("image", "latent" if spec.latent else "magnitude",
                            int(unet["out_channels"]), spec.input_shape, "float32", [], patch,
                            {str(c): what for c in range(int(unet["out_channels"]))}),
        },
    }


def _anomaly_data_format(spec: BundleSpec) -> dict[str, Any]:
    """The files the workflow reads and writes (any grid: resampled internally and back)."""
    any_grid = ["*", "*", "*"]
    outputs = {
        "anomaly": _tensor("image", "magnitude", 1, any_grid, "float32", [], False,
                           {"0": "voxel anomaly score (post-processed residual |x - x_hat|)"}),
        "reconstruction": _tensor("image", "magnitude", 1, any_grid, "float32", [], False,
                                  {"0": "pseudo-healthy reconstruction, in the input's units"}),
        "segmentation": _tensor("image", "segmentation", 1, any_grid, "uint8", [0, 1], False,
                                {"0": "normal", "1": "anomalous (map > calibrated voxel "
                                 "threshold; written only with thresholds)"}),
    }
    return {
        "inputs": {"image": _tensor("image", "hounsfield" if spec.modality == "CT" else "magnitude",
                                    1, any_grid, "float32", [], False, {"0": "image"},
                                    modality=spec.modality)},
        "outputs": outputs,
    }


def _method_summary(spec: BundleSpec) -> str:
    m = spec.method
    starts = (f"t = {'/'.join(str(t) for t in m['t_starts'])}" if m["method"] == "ensemble"
              else f"t = {m['t_start']}")
    return (f"method {m['method']} ({starts} of {spec.diffusion.get('num_train_timesteps', 1000)}, "
            f"{m['steps']} {m['sampler']} step(s), {m['noise']} noise), "
            f"{spec.postprocess['residual']} residual, median filter {spec.postprocess['median_size']}, "
            f"mask erosion {spec.postprocess['erode']}, seed {spec.seed}")


def _grid(spec: BundleSpec) -> str:
    p = spec.preprocessing
    spacing = " x ".join(f"{float(s):g}" for s in p.get("spacing") or [])
    shape = " x ".join(str(s) for s in p.get("shape") or [])
    return f"{str(p.get('modality', 'mri')).upper()} resampled to {spacing} mm, {p.get('orientation', 'RAS')} grid {shape}"


def _references(spec: BundleSpec) -> list[str]:
    keys = ["diffusion"]
    method = spec.method["method"]
    if method in ("anoddpm", "patched", "ensemble"):
        keys.append(method)
    if spec.method["sampler"] == "ddim":
        keys.append("ddim")
    if spec.method["noise"] == "simplex" and "anoddpm" not in keys:
        keys.append("anoddpm")
    if spec.diffusion.get("prediction_type") == "flow":
        keys.append("flow")
    if spec.latent:
        keys.append("latent")
    keys.append("monai")
    return [_REFERENCES[k] for k in keys]


def metadata(spec: BundleSpec, command: Sequence[str]) -> dict[str, Any]:
    """``configs/metadata.json`` (``command``: :func:`anomaly_command`)."""
    facts = spec.card_facts
    network = "latent diffusion model (autoencoder + DiffusionModelUNet on its latent)" if spec.latent \
        else "DiffusionModelUNet"
    description = (
        f"Unsupervised anomaly detection in {spec.modality} scans by partial diffusion: a "
        f"{spec.spatial_dims}D MONAI {network} trained on healthy scans only "
        f"({_grid(spec)}) reconstructs each scan from a partly noised copy; the post-processed "
        f"residual is the voxel anomaly map, written on the input's own grid. {_method_summary(spec)}."
    )
    if facts.get("description"):
        description = f"{facts['description']}. {description}"
    thresholds = None
    if spec.thresholds is not None:
        thresholds = {k: spec.thresholds.get(k) for k in
                      ("voxel_threshold", "scan_threshold", "fpr", "num_scans")}
        thresholds["file"] = "models/thresholds.json"
    changelog = f"exported by medidiff {spec.medidiff_version} from {spec.checkpoint_source}"
    return {
        "schema": SCHEMA_URL,
        "version": spec.version,
        "changelog": {spec.version: changelog},
        "monai_version": spec.packages.get("monai", "unknown"),
        "pytorch_version": spec.packages.get("torch", "unknown"),
        "numpy_version": spec.packages.get("numpy", "unknown"),
        "required_packages_version": {
            k: v for k, v in spec.packages.items() if k not in ("monai", "torch", "numpy")
        },
        "supported_apps": {},
        "name": f"medidiff anomaly detection: {spec.name}",
        "task": f"Unsupervised anomaly detection (voxel anomaly maps, segmentations, scan scores) "
                f"in {spec.modality} scans",
        "description": description,
        "authors": spec.authors,
        "copyright": f"Copyright (c) {spec.authors}",
        "data_source": str(facts.get("data") or (spec.config.get("data") or {}).get("datalist")
                           or "unknown"),
        "data_type": "nibabel",
        "image_classes": f"single-channel {spec.modality} volume (NIfTI, NRRD, MHA or DICOM "
                         f"series), any grid; {_grid(spec)} and intensities scaled to [0, 1] "
                         "internally",
        "label_classes": "none: trained on healthy scans only (unsupervised)",
        "pred_classes": "anomaly map (float32), reconstruction (float32), segmentation "
                        "(uint8: 1 anomalous, with thresholds), on the input's grid",
        "eval_metrics": {},
        "intended_use": "Research only; not for clinical use or diagnosis.",
        "references": _references(spec),
        "network_data_format": _network_data_format(spec),
        "anomaly_data_format": _anomaly_data_format(spec),
        "medidiff": {
            "version": spec.medidiff_version,
            "checkpoint": {
                "file": "models/model.safetensors",
                "sha256": spec.sha256,
                "source": spec.checkpoint_source,
                "network": spec.network,
                "stored_dtype": spec.stored_dtype,
                "step": spec.step,
            },
            "preprocessing": dict(spec.preprocessing),
            "method": dict(spec.method),
            "postprocess": dict(spec.postprocess),
            "seed": spec.seed,
            "batch_size": spec.batch_size,
            "thresholds": thresholds,
            "equivalent_command": shlex.join(command),
        },
    }


# --------------------------------------------------------------------------------------------
# docs/README.md and LICENSE
# --------------------------------------------------------------------------------------------


def _table(rows: Sequence[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])


def readme(spec: BundleSpec, command: Sequence[str], files: Mapping[str, str]) -> str:
    """``docs/README.md`` (``files``: bundle-relative path -> SHA-256)."""
    b = spec.name
    seg = ("`NAME_seg.nii.gz` (uint8 segmentation at the calibrated voxel threshold) and "
           "`flagged` in scores.csv, " if spec.thresholds else "")
    thresholds_row = (
        f"`models/thresholds.json`: voxel {spec.thresholds['voxel_threshold']:.6g}, scan "
        f"{spec.thresholds['scan_threshold']:.6g} at FPR {spec.thresholds['fpr']:g} "
        f"({spec.thresholds.get('num_scans')} healthy scans)"
        if spec.thresholds else "none (no segmentation; pass `--thresholds_path FILE` from "
        "`medidiff calibrate` with this checkpoint and these settings)"
    )
    rows = [
        ("task", f"unsupervised anomaly detection in {spec.modality} scans"),
        ("network", f"{spec.spatial_dims}D MONAI DiffusionModelUNet"
                    + (" on an autoencoder's latent" if spec.latent else "")
                    + f", {spec.stored_dtype} weights"
                    + (f", step {spec.step}" if spec.step is not None else "")),
        ("model grid", _grid(spec)),
        ("diffusion", (f"{spec.diffusion.get('num_train_timesteps', 1000)} steps, "
                       f"{spec.diffusion.get('schedule', '?')} schedule, "
                       f"{spec.diffusion.get('prediction_type', '?')} prediction, "
                       f"{spec.diffusion.get('noise', '?')} noise")),
        ("method", _method_summary(spec)),
        ("thresholds", thresholds_row),
        ("checkpoint", (f"`models/model.safetensors` (sha256 `{spec.sha256[:16]}...`), from "
                        f"`{spec.checkpoint_source}`")),
        ("exported with", (f"medidiff {spec.medidiff_version}, MONAI "
                           f"{spec.packages.get('monai', '?')}, "
                           f"PyTorch {spec.packages.get('torch', '?')}")),
    ]
    weights = "\n".join(f"- `{path}` (sha256 `{digest[:16]}...`)" for path, digest in files.items())
    card = ("\nThe model card of the shipped model is `docs/model_card.md`.\n"
            if spec.model_card else "")
    models_pt = ("`models/model.pt` (the latent U-Net) and `models/model_autoencoder.pt`"
                 if spec.latent else "`models/model.pt`")
    return f"""# {b}: medidiff anomaly detection as a MONAI bundle

A diffusion model trained on healthy {spec.modality} scans, packaged as a
[MONAI bundle](https://docs.monai.io/en/latest/mb_specification.html) by
`medidiff export-bundle`. Each input scan is brought onto the model grid, partly noised,
denoised back towards "healthy", and the post-processed residual is written as a voxel
anomaly map on the input's own grid and affine.
{card}
{_table(rows)}

## Requirements

medidiff {spec.medidiff_version} or later installed in the Python environment
(`pip install -e .` in a medidiff checkout); it brings MONAI, PyTorch, nibabel, SimpleITK and
`fire` (which `python -m monai.bundle` needs). The workflow runs medidiff's own detector:
`configs/inference.json` names medidiff classes in its `_target_` entries.

## Run

From the folder that holds `{b}/`:

```bash
python -m monai.bundle run \\
    --config_file {b}/configs/inference.json \\
    --meta_file {b}/configs/metadata.json \\
    --logging_file {b}/configs/logging.conf \\
    --bundle_root {b} \\
    --dataset_dir scans/ \\
    --output_dir results/
```

`--meta_file` and `--logging_file` may be left out (MONAI then reads them from the config's
folder). `--dataset_dir` takes what `medidiff anomaly --input` takes: a file, a folder, a glob,
or a datalist (CSV or Decathlon `dataset.json`, with `--split NAME`); several files as
`--dataset_dir "['a.nii.gz','b.nii.gz']"`. Other settings can be overridden the same way:
`--masks DIR` (brain masks named like the inputs), `--device cpu`, `--batch_size 4`,
`--overlays False`, `--overwrite True`, `--thresholds_path FILE`, or any method key, e.g.
`--method#steps 5` (thresholds are tied to the method and post-processing: change those and
calibrate again).

## Outputs

In `--output_dir`, for each input `NAME`: `NAME_anomaly.nii.gz` (float32 anomaly map),
`NAME_recon.nii.gz` (reconstruction, input units), {seg}`NAME_overlay.png`, plus
`scores.csv` (one row per scan) and `anomaly_config.json` (method, checkpoint SHA-256, seed,
version). A rerun into the same folder resumes; inputs that cannot be read are reported and
skipped, and the run then ends with an error that lists them.

## The same run with medidiff

The bundle writes the same maps as this command (every setting spelled out; run from
`{b}/`):

```bash
{shlex.join(command)}
```

## Files

- `configs/inference.json`: the workflow (`run` scores `dataset` with `inferer`, a medidiff
  `AnomalyDetector`, through `evaluator`); `network_def` rebuilds the bare MONAI network of
  {models_pt} for tools that want the network alone.
- `configs/metadata.json`: MONAI's bundle metadata; `network_data_format` describes the
  network's tensors, `anomaly_data_format` the workflow's files, `medidiff` the exact settings.
- `configs/logging.conf`: log to stdout.
{weights}

## Python

```python
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config("{b}/configs/inference.json")
parser.update({{"bundle_root": "{b}", "dataset_dir": "scans/", "output_dir": "results/"}})
detector = parser.get_parsed_content("inferer")      # medidiff.anomaly.detector.AnomalyDetector
result = detector.score_file("scans/case.nii.gz")   # .anomaly_map, .reconstruction, .score
```

## Limits

Research only, not for clinical use. The model knows only what its training scans showed:
inputs should match its modality, contrast and preprocessing (skull-stripped or not, as in
training). The metadata's `schema` names MONAI's model-zoo schema; it was not checked at
export (no network access): run `python -m monai.bundle verify_metadata --meta_file
{b}/configs/metadata.json --filepath schema.json` where the schema can be downloaded.
"""


def license_text(spec: BundleSpec) -> str:
    """``LICENSE``: the code's terms and the weights' terms (given, shipped, or unknown)."""
    if spec.license is not None:
        weights = spec.license.strip()
    elif spec.model_card is not None:
        weights = (
            "The weights in models/ are a default model shipped with medidiff and are released "
            "with it under the Apache License, Version 2.0. They were trained on medidiff's "
            "synthetic sample_data, made from the MNI ICBM 152 2009a template as distributed "
            "with nilearn; see that template's own terms."
        )
    else:
        weights = (
            "The weights in models/ belong to whoever trained them; no licence was given when "
            "this bundle was exported (medidiff export-bundle --license FILE includes one)."
        )
    return (
        "This bundle has two parts.\n\n"
        "Code: the workflow in configs/ runs medidiff and MONAI, both under the Apache License, "
        "Version 2.0 (https://www.apache.org/licenses/LICENSE-2.0).\n\n"
        f"Weights:\n{weights}\n"
    )


def dumps(obj: Any) -> str:
    """JSON as the bundle writes it (indented, key order kept, a final newline)."""
    return json.dumps(obj, indent=4) + "\n"
