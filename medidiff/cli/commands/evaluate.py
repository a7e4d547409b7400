"""Voxel- and scan-level metrics of anomaly maps against ground-truth lesion masks.

Matches files by name: for a ground-truth mask NAME.nii.gz the prediction is
PRED/NAME_anomaly.nii.gz (as written by 'medidiff anomaly'), its binary segmentation
PRED/NAME_seg.nii.gz if present, and its scan score the row of PRED/scores.csv whose
'name' (or 'file') column names NAME. --truth is a folder of lesion masks (one file per
scan, all zero for a healthy scan) or a datalist: a Decathlon dataset.json (split 'test'
unless --split says otherwise) or CSV, whose entries give the lesion mask ('label' /
'segmentation'), the brain mask ('mask') and the group ('kind'). Predictions and truth
must share shape and affine. Brain masks come from --masks (same file names), the
datalist, or else the standard layout, which is looked for: a folder named brainmasks
(or brain_masks, brainmask, brain_mask) beside the lesion masks' folder, e.g.
sample_data/test/brainmasks/ for sample_data/test/labels/, with a mask for every scan.
Without masks every voxel counts, background included, which makes voxel AUROC/AUPRC
optimistic: the output then opens with a WARNING line (also on stderr and in the JSON's
"warnings"); --no-masks says that this is intended and skips the search.

Reported: voxel AUROC and AUPRC (pooled over all scans inside the masks); Dice at the
calibrated threshold (the _seg files, else anomaly map > the voxel_threshold of
--thresholds), both dataset-wise (TP/FP/FN summed over scans; Baur et al. 2021) and per
scan (mean ± std over scans with lesions); the ORACLE dataset-wise Dice, whose threshold
is chosen on the labels (an optimistic upper bound, not a deployable result); scan-level
AUROC (lesion scans vs healthy scans) when scores exist; per-group rows. A table goes to
stdout, JSON to --out (written atomically; an existing file is replaced only with
--overwrite). NaN (undefined) values are null in the JSON.

Exit status: 0 when every ground-truth case had a prediction; 4 when some had none (the
others are evaluated and the missing ones listed); 1 on bad input.

Examples:
    medidiff evaluate --pred out/ --truth sample_data/dataset.json --out metrics.json
    medidiff evaluate --pred out/ --truth labels/ --masks brainmasks/ --thresholds thresholds.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from medidiff.anomaly.metrics import EvaluationReport

EXIT_MISSING = 4

_ANOMALY_SUFFIX = "_anomaly"
_SEG_SUFFIX = "_seg"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, metavar="DIR",
                   help="folder of 'medidiff anomaly' outputs (NAME_anomaly.nii.gz, "
                        "NAME_seg.nii.gz, scores.csv)")
    p.add_argument("--truth", required=True, metavar="DIR_OR_DATALIST",
                   help="folder of ground-truth lesion masks (NAME.nii.gz), or a dataset.json / "
                        "CSV datalist with lesion masks, brain masks and kinds")
    masks = p.add_mutually_exclusive_group()
    masks.add_argument("--masks", metavar="DIR",
                       help="folder of brain masks with the same file names (overrides the "
                            "datalist's; default: the datalist's, else a brainmasks/ folder "
                            "beside the lesion masks' folder when it has a mask for every scan)")
    masks.add_argument("--no-masks", action="store_true",
                       help="count every voxel, background included (optimistic voxel metrics); "
                            "no search for brain masks")
    p.add_argument("--thresholds", metavar="JSON",
                   help="thresholds JSON from 'medidiff calibrate'; its voxel_threshold is used "
                        "for scans without a NAME_seg file")
    p.add_argument("--split", metavar="NAME",
                   help="which list of a dataset.json to use (default: test), or which rows of a "
                        "CSV with a split column (default: all)")
    p.add_argument("--out", metavar="JSON", help="metrics JSON to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    from medidiff.anomaly.metrics import evaluate_cases
    from medidiff.anomaly.outputs import ScoresTable
    from medidiff.cli.commands._common import check_json_out
    from medidiff.io.atomic import write_json_atomic

    if args.out:
        check_json_out(args.out, args.overwrite)
    pred_dir = Path(args.pred).expanduser()
    if not pred_dir.is_dir():
        from medidiff.errors import DataError

        raise DataError(
            f"--pred {pred_dir}: not a folder; give the output folder of 'medidiff anomaly'"
        )
    targets, no_truth, split = _truth_targets(args.truth, args.split)
    mask_source = "datalist" if any(t["mask"] is not None for t in targets) else "none"
    if args.masks:
        targets = _with_mask_folder(targets, Path(args.masks).expanduser())
        mask_source = f"--masks {args.masks}"
    elif args.no_masks:
        targets = [{**t, "mask": None} for t in targets]
        mask_source = "none (--no-masks)"
    else:
        targets, found = _standard_masks(targets)
        if found is not None:
            mask_source = f"found: {found}"
            print(f"brain masks: {found} (beside the lesion masks; --masks DIR gives others, "
                  "--no-masks counts every voxel)")
    voxel_threshold = _read_voxel_threshold(args.thresholds) if args.thresholds else None
    scores = ScoresTable(pred_dir / "scores.csv").scores()

    matched, missing = [], []
    for target in targets:
        anomaly = _find_volume(pred_dir, target["name"] + _ANOMALY_SUFFIX)
        if anomaly is None:
            missing.append(target["name"])
        else:
            matched.append({**target, "anomaly": anomaly,
                            "seg": _find_volume(pred_dir, target["name"] + _SEG_SUFFIX)})
    if not matched:
        from medidiff.errors import DataError

        example = pred_dir / f"{targets[0]['name']}{_ANOMALY_SUFFIX}.nii.gz"
        raise DataError(
            f"--pred {pred_dir}: no anomaly map for any of the {len(targets)} ground-truth cases "
            f"(expected e.g. {example}); run 'medidiff anomaly' on the same scans first"
        )

    cases = [_load_case(m, scores.get(m["name"])) for m in _progress(matched)]
    report = evaluate_cases(cases, voxel_threshold=voxel_threshold)
    notes = list(report.notes)
    n_seg = sum(m["seg"] is not None for m in matched)
    if voxel_threshold is not None and n_seg:
        notes.append(f"{n_seg} scans have a _seg file: it is used instead of --thresholds for them")
    if no_truth:
        notes.append(f"{len(no_truth)} datalist entries have no ground-truth segmentation and were "
                     f"skipped: {_names(no_truth)}")
    if missing:
        notes.append(f"{len(missing)} of {len(targets)} ground-truth cases have no prediction in "
                     f"{pred_dir} and were not evaluated: {_names(missing)}")
    from dataclasses import replace

    report = replace(report, notes=tuple(notes))
    if report.mask_warning and not args.no_masks:  # asked for: the table's line suffices
        import sys

        print(f"medidiff: warning: {report.mask_warning}", file=sys.stderr, flush=True)
    print(report.table())
    if args.out:
        out = write_json_atomic(
            args.out, _json(report, args, pred_dir, split, missing, no_truth, mask_source))
        print(f"metrics written to {out}")
    if missing:
        import sys

        print(f"medidiff: {len(missing)} ground-truth cases had no prediction and were not "
              f"evaluated: {_names(missing)}", file=sys.stderr)
        return EXIT_MISSING
    return 0


def _names(names: list[str], limit: int = 10) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _progress(items: list[Any]) -> Any:
    from medidiff.runtime.progress import progress_iter

    # a bar on a terminal; in a log a line every 30 s while it runs, none at the end
    return progress_iter(items, "evaluating", unit="scan", leave=False)


def _truth_targets(
    truth: str, split: str | None
) -> tuple[list[dict[str, Any]], list[str], str | None]:
    """Ground-truth cases (dicts: name, truth, mask, group), entries without truth, split used."""
    from medidiff.data.datalist import volume_files
    from medidiff.errors import DataError
    from medidiff.io.volume import VOLUME_SUFFIXES, strip_volume_suffix

    path = Path(truth).expanduser()
    no_truth: list[str] = []
    if path.is_dir():
        files = volume_files(path)
        if not files:
            raise DataError(
                f"--truth {path}: no lesion masks ({', '.join(VOLUME_SUFFIXES)}) in this folder"
            )
        targets = [{"name": strip_volume_suffix(p.name), "truth": p, "mask": None, "group": None}
                   for p in files]
    elif path.is_file() and path.name.lower().endswith((".json", ".csv", ".tsv")):
        from medidiff.data.datalist import load_datalist

        if split is None and path.name.lower().endswith(".json"):
            split = "test"
        entries = load_datalist(path, split=split)
        targets = []
        for e in entries:
            if e.segmentation is None:
                no_truth.append(e.name)
                continue
            group = e.extra.get("kind", e.extra.get("group"))
            targets.append({"name": e.name, "truth": e.segmentation, "mask": e.mask,
                            "group": None if group in (None, "") else str(group)})
        if not targets:
            raise DataError(
                f"--truth {path}: no entry{f' of split {split!r}' if split else ''} has a "
                "ground-truth segmentation ('label' or 'segmentation'); "
                "pick another split with --split"
            )
    elif path.exists():
        raise DataError(
            f"--truth {path}: expected a folder of lesion masks or a dataset.json / CSV datalist"
        )
    else:
        raise DataError(f"--truth {path}: no such file or folder")
    names = [t["name"] for t in targets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"--truth {path}: case names must be unique to match predictions; "
                        f"repeated: {_names(repeated)}")
    return targets, no_truth, split


def _find_volume(folder: Path, stem: str) -> Path | None:
    """``folder/stem<volume suffix>`` if exactly such a file exists (.nii.gz preferred)."""
    from medidiff.io.volume import VOLUME_SUFFIXES

    for suffix in (".nii.gz", *VOLUME_SUFFIXES):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _with_mask_folder(targets: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    from medidiff.errors import DataError

    if not folder.is_dir():
        raise DataError(f"--masks {folder}: not a folder of brain masks")
    found, lacking = [], []
    for t in targets:
        mask = _find_volume(folder, t["name"])
        if mask is None:
            lacking.append(t["name"])
        found.append({**t, "mask": mask})
    if lacking:
        raise DataError(f"--masks {folder}: no brain mask for {len(lacking)} cases "
                        f"({_names(lacking)}); expected e.g. {folder / (lacking[0] + '.nii.gz')}")
    return found


#: folder names of brain masks beside the lesion masks' folder (sample_data: brainmasks/)
MASK_FOLDERS = ("brainmasks", "brain_masks", "brainmask", "brain_mask")


def _standard_masks(targets: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """Brain masks for the targets without one, from the standard layout: for a lesion mask
    ``ROOT/labels/NAME.nii.gz``, ``ROOT/brainmasks/NAME.nii.gz`` (or another name of
    :data:`MASK_FOLDERS`). Used only when every such target has one there.

    Returns:
        The targets (with masks where found) and the folder they came from, as text
        (``None``: nothing found, targets unchanged).
    """
    lacking = [t for t in targets if t["mask"] is None]
    if not lacking:
        return targets, None
    for folder_name in MASK_FOLDERS:
        found: dict[str, Path] = {}
        for t in lacking:
            truth_dir = Path(t["truth"]).parent
            folder = truth_dir.parent / folder_name
            mask = _find_volume(folder, t["name"]) if folder != truth_dir else None
            if mask is None:
                break
            found[t["name"]] = mask
        else:
            folders = sorted({str(m.parent) for m in found.values()})
            where = folders[0] if len(folders) == 1 else f"{folders[0]} and {len(folders) - 1} more"
            return [{**t, "mask": t["mask"] or found.get(t["name"])} for t in targets], where
    return targets, None


def _read_voxel_threshold(path_text: str) -> float:
    """The ``voxel_threshold`` key of a thresholds JSON (other keys are ignored)."""
    import json
    import math

    from medidiff.errors import ConfigError

    path = Path(path_text).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--thresholds {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--thresholds {path}: not valid JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--thresholds {path}: cannot read ({exc})") from None
    if not isinstance(data, dict) or "voxel_threshold" not in data:
        raise ConfigError(f"--thresholds {path}: no 'voxel_threshold' key; give the JSON "
                          "written by 'medidiff calibrate'")
    value = data["voxel_threshold"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(
            f"--thresholds {path}: 'voxel_threshold' must be a finite number; got {value!r}"
        )
    return float(value)


def _load_case(match: dict[str, Any], score: float | None) -> Any:
    """Load one case's volumes, check they share a grid, and keep the masked voxels only."""
    import numpy as np

    from medidiff.io.volume import check_same_grid, load_volume
    from medidiff.anomaly.metrics import Case

    truth = load_volume(match["truth"])
    anomaly = load_volume(match["anomaly"])
    check_same_grid(truth, anomaly)
    arrays: dict[str, Any] = {}
    for key in ("seg", "mask"):
        if match[key] is not None:
            volume = load_volume(match[key])
            check_same_grid(truth, volume)
            arrays[key] = volume.array != 0
    amap = anomaly.array
    if amap.dtype != np.float32 and amap.dtype.kind == "f":
        amap = amap.astype(np.float32)
    case = Case(
        name=match["name"],
        anomaly_map=amap,
        truth=truth.array != 0,
        mask=arrays.get("mask"),
        segmentation=arrays.get("seg"),
        score=score,
        group=match["group"],
    )
    return case.compact()


def _json(
    report: EvaluationReport,
    args: argparse.Namespace,
    pred_dir: Path,
    split: str | None,
    missing: list[str],
    no_truth: list[str],
    mask_source: str,
) -> dict[str, Any]:
    from medidiff import __version__

    return {
        **report.to_dict(),
        "inputs": {
            "pred": str(pred_dir),
            "truth": str(args.truth),
            "split": split,
            "masks": mask_source,
            "thresholds": args.thresholds,
        },
        "missing_predictions": missing,
        "entries_without_truth": no_truth,
        "medidiff_version": __version__,
    }
