"""What the demo's metrics.json and report say: quality bars, the per-kind table, per-scan
rows, model and machine facts, and the commands that reproduce the numbers.

Example:
    >>> finite_or_none(float("nan")) is None, jsonable({"a": (1.0, float("inf"))})
    (True, {'a': [1.0, None]})
"""

from __future__ import annotations

import math
import os
import platform
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import medidiff

__all__ = [
    "AUROC_BAR",
    "FPR",
    "LESION_KINDS",
    "SYNTH_SAMPLER",
    "SYNTH_STEPS",
    "QualityCheck",
    "anomaly_3d_per_kind",
    "checkpoint_facts",
    "cost_per_volume",
    "finite_or_none",
    "jsonable",
    "machine_facts",
    "per_kind_table",
    "quality_checks",
    "rel_path",
    "reproduce_commands",
    "scan_rows",
    "shipped_name",
    "synthesis_settings",
]

#: the lesion kinds of sample_data whose AUPRC is a quality bar
LESION_KINDS = ("tumor", "ms", "stroke")
#: the quality bar on the default method's voxel AUROC over all test scans
AUROC_BAR = 0.90
#: the calibration false-positive rate (voxels and scans)
FPR = 0.05
#: the fast synthesis sampler (Lu et al. 2022: good samples at 10-20 steps); a rectified-flow
#: model, which it cannot sample, takes its own (see :func:`synthesis_settings`)
SYNTH_SAMPLER, SYNTH_STEPS = "dpm++2m", 20


def synthesis_settings(prediction_type: str) -> tuple[str, int]:
    """The demo's ``(sampler, steps)`` for a model of ``prediction_type``: DPM-Solver++(2M)
    with 20 steps where it fits, else the model's own default sampler with its default
    steps (rectified flow: Euler, 30 steps; :func:`medidiff.diffusion.samplers.sampler_for`).

    Example:
        >>> synthesis_settings("v_prediction"), synthesis_settings("flow")
        (('dpm++2m', 20), ('euler', 30))
    """
    from medidiff.constants import SYNTHESIS_DEFAULT_STEPS
    from medidiff.diffusion.samplers import sampler_for

    sampler = sampler_for(prediction_type, None, SYNTH_SAMPLER)
    return sampler, SYNTH_STEPS if sampler == SYNTH_SAMPLER else int(SYNTHESIS_DEFAULT_STEPS[sampler])


@dataclass(frozen=True)
class QualityCheck:
    """One quality bar of the report.

    Attributes:
        name: short name, e.g. ``"auprc_tumor"``.
        description: what is compared, in words.
        value: the default method's number.
        reference: the number it is compared with (the baseline's).
        passed: ``True``/``False``; ``None`` when it could not be evaluated (e.g. no scan
            of that kind with ``limit``).
        detail: the verdict in one sentence.
    """

    name: str
    description: str
    value: float | None
    reference: float | None
    passed: bool | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "value": finite_or_none(self.value),
            "reference": finite_or_none(self.reference),
            "passed": self.passed,
            "detail": self.detail,
        }


def finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def jsonable(obj: Any) -> Any:
    """Strict-JSON form: NaN/Inf -> None, numpy scalars -> Python, paths -> str."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def group_numbers(g: Any) -> dict[str, Any]:
    return {
        "n_scans": g.n_scans,
        "voxel_auroc": finite_or_none(g.voxel.auroc),
        "voxel_auprc": finite_or_none(g.voxel.auprc),
        "dice_dataset_wise": finite_or_none(g.dice_dataset_wise),
        "dice_per_scan_mean": finite_or_none(g.dice_per_scan_mean),
        "voxel_fpr": finite_or_none(g.voxel_fpr),
        "oracle_dice": finite_or_none(g.oracle.dice),
        "scan_auroc": finite_or_none(g.scan.auroc),
    }


def per_kind_table(default: Any, baseline: Any) -> dict[str, dict[str, Any]]:
    """kind -> {"default": numbers, "baseline": numbers}, lesion kinds first, then "all"."""
    kinds = [k for k in LESION_KINDS if k in default.groups]
    kinds += sorted(k for k in default.groups if k not in kinds)
    table = {
        k: {"default": group_numbers(default.groups[k]),
            "baseline": group_numbers(baseline.groups[k])}
        for k in kinds
    }
    table["all"] = {"default": group_numbers(default.overall),
                    "baseline": group_numbers(baseline.overall)}
    return table


def fmt_number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def quality_checks(per_kind: Mapping[str, Mapping[str, Any]]) -> tuple[QualityCheck, ...]:
    """The bars: voxel AUROC (all scans) and AUPRC per lesion kind, default vs baseline."""
    checks = []
    allrow = per_kind["all"]
    value, ref = allrow["default"]["voxel_auroc"], allrow["baseline"]["voxel_auroc"]
    passed = None if value is None else bool(value >= AUROC_BAR)
    checks.append(QualityCheck(
        "voxel_auroc",
        f"voxel AUROC of the default method over all test scans (inside the brain masks) "
        f">= {AUROC_BAR:.2f}",
        value, AUROC_BAR, passed,
        f"voxel AUROC {fmt_number(value)} (default method; intensity baseline {fmt_number(ref)}), "
        f"bar {AUROC_BAR:.2f}: "
        + {True: "PASS", False: f"FAIL, short by {AUROC_BAR - (value or 0):.3f}",
           None: "not evaluated"}[passed],
    ))
    for kind in LESION_KINDS:
        row = per_kind.get(kind)
        value = row["default"]["voxel_auprc"] if row else None
        ref = row["baseline"]["voxel_auprc"] if row else None
        passed = None if value is None or ref is None else bool(value > ref)
        verdict = {True: "PASS, the default method is better",
                   False: "FAIL, the default method is not better than the baseline",
                   None: "not evaluated (no test scan of this kind)" if row is None
                   else "not evaluated (undefined)"}[passed]
        checks.append(QualityCheck(
            f"auprc_{kind}",
            f"voxel AUPRC on the {kind} scans, default method vs intensity baseline",
            value, ref, passed,
            f"{kind}: voxel AUPRC {fmt_number(value)} (default method) vs {fmt_number(ref)} "
            f"(intensity baseline): {verdict}",
        ))
    return tuple(checks)


def scan_rows(scored: Sequence[Any], evaluation: Any, base_evaluation: Any,
               out: Path) -> list[dict[str, Any]]:
    """The per-scan table: the default method's row and Dice, the baseline's score and Dice."""
    base_cases = {c.name: c for c in base_evaluation.cases}
    rows = []
    for s, case in zip(scored, evaluation.cases):
        b = base_cases.get(s.name)
        rows.append({
            "name": s.name,
            "kind": s.kind,
            "score": s.row["score"],
            "flagged": s.row["flagged"] == "yes",
            "voxels_over_threshold": s.row["voxels_over_threshold"],
            "lesion_voxels": case.lesion_voxels,
            # Dice of a scan without lesion is undefined (0 with any false positive)
            "dice": finite_or_none(case.dice) if case.has_lesion else None,
            "seconds": s.row["seconds"],
            "network_evaluations": s.row["network_evaluations"],
            "baseline_score": b.score if b else None,
            "baseline_dice": finite_or_none(b.dice) if b and b.has_lesion else None,
            "files": {k: rel_path(v, out) for k, v in s.files.items()},
        })
    return rows


def anomaly_3d_per_kind(latent: Any, per_kind: Mapping[str, Mapping[str, Any]]
                        ) -> dict[str, dict[str, Any]]:
    """kind -> {"latent_3d": numbers of the 3D latent method, "default_2d": the 2D default
    method's numbers}, in the order of ``per_kind`` (the 2D table), "all" last."""
    groups = {**latent.groups, "all": latent.overall}
    return {k: {"latent_3d": group_numbers(groups[k]), "default_2d": dict(row["default"])}
            for k, row in per_kind.items() if k in groups}


def cost_per_volume(scored: Sequence[Any]) -> dict[str, float | None]:
    """Mean network evaluations and seconds per scored volume (scan)."""
    rows = [s.row for s in scored]
    if not rows:
        return {"nfe_per_volume": None, "seconds_per_volume": None}
    return {"nfe_per_volume": float(np.mean([r["network_evaluations"] for r in rows])),
            "seconds_per_volume": float(np.mean([r["seconds"] for r in rows]))}


# --------------------------------------------------------------------------------------------
# facts for the report
# --------------------------------------------------------------------------------------------


def checkpoint_facts(ckpt: Any, shipped_name: str | None) -> dict[str, Any]:
    """The checkpoint's own record, plus the model card's facts when it is a shipped model."""
    from medidiff.config import Config

    try:
        cfg = Config.from_dict(ckpt.config)
        model = {"spatial_dims": cfg.model.spatial_dims, "preset": cfg.model.preset}
        d = cfg.diffusion
        diffusion = {"schedule": d.schedule, "T": d.num_train_timesteps, "noise": d.noise,
                     "prediction_type": d.prediction_type}
    except Exception:  # noqa: BLE001 - facts only; an unusable config already failed earlier
        model, diffusion = {}, {}
    params = int(sum(int(np.prod(t.shape)) for t in ckpt.state_dict.values()))
    prep = ckpt.preprocessing or {}
    facts: dict[str, Any] = {
        "path": str(ckpt.path),
        "sha256": ckpt.sha256,
        "training_step": ckpt.extra.get("step"),
        "parameters": params,
        "grid_shape": prep.get("shape"),
        "grid_spacing_mm": prep.get("spacing"),
        **model,
        **diffusion,
        "written_by": f"medidiff {ckpt.version}",
    }
    card: dict[str, Any] = {}
    if shipped_name is not None:
        from medidiff.models.pretrained import model_card_facts

        card = model_card_facts(shipped_name)
    return {"name": shipped_name or Path(ckpt.path).name, "shipped": shipped_name is not None,
            "checkpoint": facts, "card": card}


def shipped_name(arg: Any, resolved: Path, default: str) -> str | None:
    """The shipped model's name when ``resolved`` is the package's own file."""
    from medidiff.models.pretrained import MODELS, WEIGHTS_DIR

    if arg is None or (isinstance(arg, str) and arg in MODELS):
        return default if arg is None else str(arg)
    try:
        if Path(resolved).resolve().parent == WEIGHTS_DIR.resolve():
            stem = Path(resolved).name.removesuffix(".safetensors")
            return stem if stem in MODELS else None
    except OSError:
        pass
    return None


def machine_facts(device: Any) -> dict[str, Any]:
    import torch

    versions = {"medidiff": medidiff.__version__, "python": platform.python_version(),
                "torch": torch.__version__, "numpy": np.__version__}
    for module in ("monai", "nibabel", "SimpleITK", "sklearn", "scipy"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - informative only
            versions[module] = "unknown"
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if str(device).startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(device)
    return {"versions": versions, "machine": machine}


def reproduce_commands(out: Path, sample_data: Path, ckpt2d: Path, ckpt3d: Path, num_synth: int,
              limit: int | None, argv: Sequence[str] | None, *,
              synthesis: Mapping[str, tuple[str, int]] | None = None,
              anomaly_3d: bool = False) -> list[str]:
    """The shell commands that reproduce the report's numbers step by step.

    Args:
        synthesis: ``(sampler, steps)`` per model key (``"2d"``, ``"3d"``; default
            :data:`SYNTH_SAMPLER`, :data:`SYNTH_STEPS`).
        anomaly_3d: add the 3D latent anomaly scoring (calibrate, anomaly, evaluate).
    """
    settings = {"2d": (SYNTH_SAMPLER, SYNTH_STEPS), "3d": (SYNTH_SAMPLER, SYNTH_STEPS),
                **(synthesis or {})}
    q = shlex.quote
    data = q(str(sample_data / "dataset.json"))
    if argv:
        demo = "medidiff demo " + " ".join(q(a) for a in argv)
    else:
        demo = f"medidiff demo --out {q(str(out))}"
    lines = [
        "# everything at once:",
        demo,
        "# or step by step (same checkpoint, method and data):",
        f"medidiff calibrate --checkpoint {q(str(ckpt2d))} --healthy {data} --split validation "
        f"--out {q(str(out / 'thresholds.json'))}",
        f"medidiff anomaly --checkpoint {q(str(ckpt2d))} --input {data} --split test "
        f"--thresholds {q(str(out / 'thresholds.json'))} --out {q(str(out / 'anomaly'))}",
        f"medidiff evaluate --pred {q(str(out / 'anomaly'))} --truth {data} "
        f"--thresholds {q(str(out / 'thresholds.json'))}",
        f"medidiff synthesize --checkpoint {q(str(ckpt2d))} --num {num_synth} "
        f"--sampler {settings['2d'][0]} --steps {settings['2d'][1]} --out {q(str(out / 'synthesis_2d'))}",
        f"medidiff synthesize --checkpoint {q(str(ckpt3d))} --num {num_synth} "
        f"--sampler {settings['3d'][0]} --steps {settings['3d'][1]} --out {q(str(out / 'synthesis_3d'))}",
    ]
    if anomaly_3d:
        lines += [
            "# 3D latent anomaly scoring with the 3D model:",
            f"medidiff calibrate --checkpoint {q(str(ckpt3d))} --method latent --healthy {data} "
            f"--split validation --out {q(str(out / 'thresholds_3d.json'))}",
            f"medidiff anomaly --checkpoint {q(str(ckpt3d))} --method latent --input {data} --split test "
            f"--thresholds {q(str(out / 'thresholds_3d.json'))} --out {q(str(out / 'anomaly_3d'))}",
            f"medidiff evaluate --pred {q(str(out / 'anomaly_3d'))} --truth {data} "
            f"--thresholds {q(str(out / 'thresholds_3d.json'))}",
        ]
    lines += [
        "# every anomaly method and the baseline side by side:",
        f"python pipelines/benchmark_anomaly.py --checkpoint {q(str(ckpt2d))}",
    ]
    if limit is not None:
        lines.insert(3, f"# (this run scored {limit} test scans, the kinds taken in turn)")
    return lines


def rel_path(path: Any, out: Path) -> str | None:
    """``path`` relative to ``out`` (posix), or ``None`` when it is missing."""
    if path is None or not Path(path).exists():
        return None
    return Path(os.path.relpath(Path(path), out)).as_posix()
