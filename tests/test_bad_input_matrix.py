"""The bad-input matrix (issue 7): every command that reads user files or configs, run on
every kind of bad input, must give one clear ``medidiff: error:`` line naming the file and
the problem, a non-zero exit, no traceback, and leave no partial output (no output file,
no temporary). Batch commands (anomaly, calibrate, synthesize) report a bad input, skip
it and finish the good ones. The case/outcome table lives in ``docs/hardening.md``.

Volume cases x commands (one test each): missing path, empty folder, a text file named
``.nii.gz``, a truncated gzip stream, a truncated NIfTI (valid gzip, short voxel data), a
zero-byte file, a 4D volume, a 2D image, NaN/Inf voxels, an all-zero volume and a header
claiming 30000^3 voxels. Then configs (unknown key, wrong type), checkpoints (another
architecture, a pickle carrying code), outputs (read-only folder, existing output without
--overwrite) and the batch behaviour.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import pickle
import shutil
import struct
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
SOURCE = SAMPLE / "test" / "images" / "tumor-000.nii.gz"  # 96 x 112 x 96, 2 mm, RAS
HEALTHY = sorted((SAMPLE / "val" / "images").glob("*.nii.gz"))
METHOD = ["--method", "ddim", "--t-start", "6", "--steps", "2"]  # fast: 2 network calls
FAST = [*METHOD, "--no-overlay"]

pytestmark = [
    pytest.mark.skipif(not (SAMPLE / "dataset.json").exists(), reason="sample_data not built"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

# ---- the bad volumes --------------------------------------------------------------------

VOLUME_CASES = (
    "missing", "empty_folder", "not_image", "truncated_gzip", "truncated_nifti", "zero_byte",
    "4d", "2d", "nan_inf", "constant", "absurd",
)

#: what the one error line must say for each case (lower-cased substring)
REASON = {
    "missing": "no such file",
    "not_image": "not a gzip file",
    "truncated_gzip": "truncated",
    "truncated_nifti": "truncated",
    "zero_byte": "empty file (0 bytes)",
    "4d": "4d data",
    "2d": "2d image",
    "nan_inf": "nan/inf voxels",
    "constant": "constant volume",
    "absurd": "would need",
}
EMPTY_FOLDER_REASON = {"info": "no dicom series", "evaluate": "no lesion masks"}


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def make_volume_case(kind: str, folder: Path) -> Path:
    """Write the bad input ``kind`` into ``folder``; returns the path to pass."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "case.nii.gz"
    source = nib.load(SOURCE)
    data = np.asarray(source.dataobj, dtype=np.float32)
    if kind == "missing":
        return path
    if kind == "empty_folder":
        path = folder / "empty"
        path.mkdir()
    elif kind == "not_image":
        path.write_text("patient notes, not an image\n")
    elif kind == "truncated_gzip":
        packed = SOURCE.read_bytes()
        path.write_bytes(packed[: len(packed) // 2])  # the gzip stream stops half-way
    elif kind == "truncated_nifti":
        raw = gzip.decompress(SOURCE.read_bytes())
        path.write_bytes(gzip.compress(raw[: len(raw) // 3]))  # valid gzip, short voxel data
    elif kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "4d":
        _save(np.stack([data, data], axis=-1), source.affine, path)
    elif kind == "2d":
        _save(data[:, :, 48], source.affine, path)  # one axial slice, a 2D NIfTI
    elif kind == "nan_inf":
        data[40:44, 50:54, 40:44] = np.nan
        data[0, 0, 0] = np.inf
        _save(data, source.affine, path)
    elif kind == "constant":
        _save(np.zeros_like(data), source.affine, path)
    elif kind == "absurd":
        path = folder / "case.nii"
        _save(np.zeros((2, 2, 2), np.float32), np.eye(4), path)
        header = bytearray(path.read_bytes())
        struct.pack_into("<8h", header, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)  # dim[0..7]
        path.write_bytes(bytes(header))
    else:  # pragma: no cover
        raise ValueError(kind)
    return path


def temporaries(root: Path) -> list[Path]:
    """Temporary files of atomic writes (``.NAME.XXXX.tmp...``) anywhere under ``root``."""
    return [p for p in root.rglob(".*") if ".tmp" in p.name]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("medidiff: error:")]


def assert_one_clear_error(res, rc: int, *needles: str) -> str:
    """Exit status ``rc``, no traceback, exactly one error line holding every needle."""
    assert "Traceback" not in res.out + res.err, res.err
    lines = error_lines(res.err)
    assert res.rc == rc, (res.rc, res.err)
    assert len(lines) == 1, res.err
    assert "unexpected" not in lines[0], lines[0]  # an error medidiff did not anticipate
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


# ---- shared fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_folder(tiny_checkpoint_2d, tmp_path_factory) -> Path:
    """Four samples of the tiny 2D model, for evaluate-synthesis."""
    from medidiff.synthesis.folder import synthesize_to_folder
    from medidiff.synthesis.synthesizer import Synthesizer

    out = tmp_path_factory.mktemp("synthetic") / "synth"
    synth = Synthesizer(tiny_checkpoint_2d, device="cpu", steps=2, batch_size=4)
    synthesize_to_folder(synth, out, 4, montage=False)
    return out


def tiny_config(folder: Path, datalist: Path | str, extra: str = "") -> Path:
    """configs/tiny_test.yaml reading ``datalist``, 1 step, no checkpoints or previews."""
    text = (ROOT / "configs" / "tiny_test.yaml").read_text(encoding="utf-8")
    text = text.replace("datalist: ../sample_data/dataset.json", f"datalist: {datalist}")
    text = text.replace("max_steps: 20", "max_steps: 1").replace("checkpoint_every: 10",
                                                                 "checkpoint_every: 0")
    path = folder / "config.yaml"
    path.write_text(text + extra, encoding="utf-8")
    return path


def command_line(command: str, bad: Path, work: Path, ckpt: Path, synthetic: Path):
    """(argv, the outputs that must not appear) for ``command`` reading ``bad``."""
    if command == "info":
        return ["info", bad], []
    if command == "train":
        cfg = tiny_config(work, bad)
        return ["train", "--config", cfg, "--out", work / "run", "--no-progress",
                "--device", "cpu"], [work / "run"]
    if command == "anomaly":
        return ["anomaly", "--checkpoint", ckpt, "--input", bad, "--out", work / "out",
                "--device", "cpu", *FAST], [work / "out"]
    if command == "calibrate":
        return (["calibrate", "--checkpoint", ckpt, "--healthy", bad, "--out",
                 work / "thresholds.json", "--device", "cpu", *METHOD, "--allow-few"],
                [work / "thresholds.json"])
    if command == "evaluate":
        return ["evaluate", "--pred", work / "pred", "--truth", bad.parent if bad.is_file()
                else bad, "--out", work / "metrics.json"], [work / "metrics.json"]
    if command == "evaluate-synthesis":
        return ["evaluate-synthesis", "--real", bad, "--synthetic", synthetic, "--out",
                work / "metrics.json"], [work / "metrics.json"]
    raise ValueError(command)  # pragma: no cover


def write_prediction(kind: str, bad: Path, work: Path) -> None:
    """evaluate: an anomaly map named like the truth file, on its grid where it has one."""
    pred = work / "pred"
    pred.mkdir()
    source = nib.load(SOURCE)
    if kind == "2d":
        _save(np.random.default_rng(0).random((96, 112), np.float32), source.affine,
              pred / "case_anomaly.nii.gz")
    else:
        _save(np.random.default_rng(0).random(source.shape, np.float32), source.affine,
              pred / f"{'case' if kind != 'empty_folder' else 'empty'}_anomaly.nii.gz")


# outcome of each (command, case): "ok" = accepted (exit 0), "error" = refused (exit 1),
# "skip" = reported and skipped by a batch command (exit 4)
ACCEPTED = {
    "info": {"4d", "2d", "nan_inf", "constant"},  # info describes such files (counts NaN/Inf)
    "evaluate": {"2d", "constant"},  # a 2D map on a 2D mask is fine; an empty mask = healthy
}
COMMANDS = ("info", "train", "anomaly", "calibrate", "evaluate", "evaluate-synthesis")


def expected_outcome(command: str, kind: str) -> str:
    if kind in ACCEPTED.get(command, ()):
        return "ok"
    if command == "anomaly" and kind not in ("missing", "empty_folder"):
        return "skip"
    return "error"


@pytest.mark.parametrize("kind", VOLUME_CASES)
@pytest.mark.parametrize("command", COMMANDS)
def test_volume_matrix(command, kind, run_cli, tmp_path, tiny_checkpoint_2d, synthetic_folder):
    work = tmp_path / "work"
    bad = make_volume_case(kind, tmp_path / "inputs")
    work.mkdir()
    if command == "evaluate":
        write_prediction(kind, bad, work)
    argv, outputs = command_line(command, bad, work, tiny_checkpoint_2d, synthetic_folder)
    res = run_cli(argv)
    outcome = expected_outcome(command, kind)
    if outcome == "ok":
        assert res.rc == 0 and not error_lines(res.err), res.err
        return
    reason = EMPTY_FOLDER_REASON.get(command, "no volume files") if kind == "empty_folder" \
        else REASON[kind]
    line = assert_one_clear_error(res, 4 if outcome == "skip" else 1, reason, bad.name)
    if kind == "absurd":
        assert "GiB" in line  # the memory it would need, said before allocating any
    for path in outputs:
        assert not path.exists(), f"{command} left {path} behind"
    assert not temporaries(tmp_path)


def test_info_describes_what_it_accepts(run_cli, tmp_path):
    """The cases info accepts are described, not silently mangled."""
    res = run_cli(["info", make_volume_case("4d", tmp_path / "a"), "--json"])
    assert res.rc == 0 and json.loads(res.out)["shape"] == [96, 112, 96, 2]
    res = run_cli(["info", make_volume_case("2d", tmp_path / "b"), "--json"])
    assert res.rc == 0 and json.loads(res.out)["shape"] == [96, 112, 1]
    res = run_cli(["info", make_volume_case("nan_inf", tmp_path / "c"), "--json"])
    assert res.rc == 0 and json.loads(res.out)["non_finite"] == 4 * 4 * 4 + 1


def test_nan_in_an_anomaly_map_is_refused_by_evaluate(run_cli, tmp_path):
    truth = _save(np.zeros((8, 8, 8), np.uint8), np.eye(4), (tmp_path / "truth").mkdir()
                  or tmp_path / "truth" / "a.nii.gz")
    (tmp_path / "pred").mkdir()
    amap = np.zeros((8, 8, 8), np.float32)
    amap[1, 1, 1] = np.nan
    _save(amap, np.eye(4), tmp_path / "pred" / "a_anomaly.nii.gz")
    res = run_cli(["evaluate", "--pred", tmp_path / "pred", "--truth", truth.parent,
                   "--out", tmp_path / "m.json"])
    assert_one_clear_error(res, 1, "a_anomaly.nii.gz", "nan/inf")
    assert not (tmp_path / "m.json").exists()


# ---- configs: unknown key, wrong type ----------------------------------------------------


def _thresholds_json(tmp_path: Path, ckpt: Path, **changes) -> Path:
    """A real thresholds file (from calibrate on two healthy scans), then edited."""
    path = tmp_path / "thresholds.json"
    from medidiff.cli.main import main

    assert main(["calibrate", "--checkpoint", str(ckpt), "--healthy", *map(str, HEALTHY[:2]),
                 "--out", str(path), "--device", "cpu", *METHOD, "--allow-few"]) == 0
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


CONFIG_CASES = [
    ("train", "yaml-unknown-key", "config key 'train.max_stepz' is unknown"),
    ("train", "yaml-wrong-type", "config key 'train.batch_size' must be int, got 'eight'"),
    ("train", "set-unknown-key", "config key 'model.depth' is unknown"),
    ("train", "set-wrong-type", "config key 'diffusion.num_train_timesteps' must be int"),
    ("train", "not-yaml", "not valid yaml"),
    ("anomaly", "thresholds-wrong-type", "'voxel_threshold' must be a finite number"),
    ("anomaly", "thresholds-foreign", "not a medidiff thresholds file"),
    ("evaluate", "thresholds-wrong-type", "'voxel_threshold' must be a finite number"),
    ("synthesize", "recorded-config-wrong-type", "holds samples of another configuration"),
    ("evaluate-synthesis", "recorded-config-wrong-type", "preprocessing"),
]


@pytest.mark.parametrize("command,variant,needle", CONFIG_CASES,
                         ids=[f"{c}-{v}" for c, v, _ in CONFIG_CASES])
def test_config_matrix(command, variant, needle, run_cli, tmp_path, tiny_checkpoint_2d,
                       synthetic_folder):
    ckpt = tiny_checkpoint_2d
    outputs: list[Path] = []
    if command == "train":
        extra = {"yaml-unknown-key": "  max_stepz: 3\n", "yaml-wrong-type": "  batch_size: eight\n"}
        cfg = tiny_config(tmp_path, SAMPLE / "dataset.json")
        if variant in extra:  # appended under the last section, train:
            text = cfg.read_text(encoding="utf-8").replace("  batch_size: 8\n", "")
            cfg.write_text(text + extra[variant], encoding="utf-8")
        if variant == "not-yaml":
            cfg.write_text("train: [max_steps: 3\n", encoding="utf-8")
        sets = {"set-unknown-key": ["--set", "model.depth=3"],
                "set-wrong-type": ["--set", "diffusion.num_train_timesteps=1e3x"]}.get(variant, [])
        argv = ["train", "--config", cfg, "--out", tmp_path / "run", "--no-progress", *sets]
        outputs = [tmp_path / "run"]
    elif command == "anomaly":
        if variant == "thresholds-wrong-type":
            thresholds = _thresholds_json(tmp_path, ckpt, voxel_threshold="high")
        else:
            thresholds = tmp_path / "thresholds.json"
            thresholds.write_text(json.dumps({"threshold": 0.5}), encoding="utf-8")
        argv = ["anomaly", "--checkpoint", ckpt, "--input", SOURCE, "--out", tmp_path / "out",
                "--thresholds", thresholds, *FAST]
        outputs = [tmp_path / "out"]
    elif command == "evaluate":
        truth = _save(np.zeros((4, 4, 4), np.uint8), np.eye(4),
                      (tmp_path / "t").mkdir() or tmp_path / "t" / "a.nii.gz")
        (tmp_path / "p").mkdir()
        _save(np.zeros((4, 4, 4), np.float32), np.eye(4), tmp_path / "p" / "a_anomaly.nii.gz")
        thresholds = tmp_path / "th.json"
        thresholds.write_text(json.dumps({"voxel_threshold": "0.5"}), encoding="utf-8")
        argv = ["evaluate", "--pred", tmp_path / "p", "--truth", truth.parent, "--thresholds",
                thresholds, "--out", tmp_path / "m.json"]
        outputs = [tmp_path / "m.json"]
        needle = "'voxel_threshold' must be a finite number"
    elif command == "synthesize":
        folder = tmp_path / "s"
        shutil.copytree(synthetic_folder, folder)
        record = json.loads((folder / "synthesis_config.json").read_text(encoding="utf-8"))
        record["steps"] = "two"
        (folder / "synthesis_config.json").write_text(json.dumps(record), encoding="utf-8")
        argv = ["synthesize", "--checkpoint", ckpt, "--num", 4, "--out", folder, "--steps", 2,
                "--device", "cpu", "--no-progress"]
        before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    else:  # evaluate-synthesis
        folder = tmp_path / "s"
        shutil.copytree(synthetic_folder, folder)
        record = json.loads((folder / "synthesis_config.json").read_text(encoding="utf-8"))
        record["preprocessing"] = "2 mm"
        (folder / "synthesis_config.json").write_text(json.dumps(record), encoding="utf-8")
        argv = ["evaluate-synthesis", "--real", *HEALTHY[:2], "--synthetic", folder]
        outputs = [folder / "synthesis_metrics.json"]
    res = run_cli(argv)
    assert_one_clear_error(res, 1, needle)
    for path in outputs:
        assert not path.exists()
    if command == "synthesize":  # the folder is left exactly as it was
        assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert not temporaries(tmp_path)


# ---- checkpoints: another architecture, a pickle carrying code ----------------------------


class _Payload:
    """Unpickling this would create ``marker``: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def other_architecture(ckpt: Path, folder: Path) -> Path:
    """The tiny model's weights under metadata describing twice the channels."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ckpt), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    kwargs = json.loads(meta["model_kwargs"])
    kwargs["channels"] = [2 * c for c in kwargs["channels"]]
    meta["model_kwargs"] = json.dumps(kwargs)
    path = folder / "other_arch.safetensors"
    save_file(tensors, str(path), meta)
    return path


def pickle_with_code(folder: Path, marker: Path, name: str = "evil.safetensors") -> Path:
    import torch

    path = folder / name
    torch.save({"state_dict": {"w": _Payload(marker)}}, path)
    # the probe is real: plain unpickling runs the payload (checked on a copy of the bytes)
    probe = folder / "probe_marker"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    probe.unlink()
    return path


CHECKPOINT_COMMANDS = ("anomaly", "calibrate", "synthesize", "evaluate-synthesis")


@pytest.mark.parametrize("damage", ["other-architecture", "pickle-with-code"])
@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
def test_checkpoint_matrix(command, damage, run_cli, tmp_path, tiny_checkpoint_2d,
                           synthetic_folder):
    marker = tmp_path / "code_ran"
    ckpt = (other_architecture(tiny_checkpoint_2d, tmp_path) if damage == "other-architecture"
            else pickle_with_code(tmp_path, marker))
    out = tmp_path / "out"
    argv = {
        "anomaly": ["anomaly", "--input", SOURCE, "--out", out, *FAST],
        "calibrate": ["calibrate", "--healthy", SOURCE, "--out", out, *METHOD, "--allow-few"],
        "synthesize": ["synthesize", "--num", 2, "--out", out, "--steps", 2, "--no-progress"],
        "evaluate-synthesis": ["evaluate-synthesis", "--real", *HEALTHY[:2], "--synthetic",
                               synthetic_folder, "--out", out],
    }[command]
    res = run_cli([*argv, "--checkpoint", ckpt])
    assert not marker.exists(), "the pickle's code ran"
    if command == "evaluate-synthesis" and damage == "other-architecture":
        # only the checkpoint's recorded preprocessing is read (no network is built): accepted
        assert res.rc == 0 and out.exists(), res.err
        return
    needle = ("weights do not match the model" if damage == "other-architecture"
              else "never unpickles")
    assert_one_clear_error(res, 1, ckpt.name, needle)
    assert not out.exists() and not temporaries(tmp_path)


def _trained_run(tmp_path: Path) -> tuple[Path, Path]:
    from medidiff.cli.main import main

    cfg = tiny_config(tmp_path, SAMPLE / "dataset.json")
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress",
                 "--set", "train.checkpoint_every=1", "--set", "train.max_steps=2",
                 "--set", "train.batch_size=2", "--device", "cpu"]) == 0
    return cfg, run


def test_train_resume_refuses_other_architecture_and_pickles(run_cli, tmp_path):
    cfg, run = _trained_run(tmp_path)
    state = run / "checkpoints" / "last.pt"
    before = state.read_bytes()
    res = run_cli(["train", "--config", cfg, "--out", run, "--resume", "--no-progress",
                   "--set", "model.channels=[16,32]", "--set", "train.max_steps=3"])
    assert_one_clear_error(res, 1, "'model' section differs", "last.pt")
    assert state.read_bytes() == before

    marker = tmp_path / "code_ran"
    state.unlink()
    pickle_with_code(state.parent, marker, name="last.pt")
    res = run_cli(["train", "--config", cfg, "--out", run, "--resume", "--no-progress",
                   "--set", "train.max_steps=3"])
    assert_one_clear_error(res, 1, "last.pt", "never unpickles")
    assert not marker.exists()


# ---- outputs: a read-only folder, an existing output without --overwrite -----------------


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nothing can be written into: mode 0555, or for root (who ignores modes) the
    immutable attribute (``chattr +i``); skipped where neither works."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)

        def undo():
            folder.chmod(0o755)
    else:
        chattr = shutil.which("chattr")
        if not chattr or subprocess.run([chattr, "+i", str(folder)],
                                        capture_output=True).returncode != 0:
            pytest.skip("running as root without a working 'chattr +i': no read-only folder")

        def undo():
            subprocess.run([chattr, "-i", str(folder)], capture_output=True)
    try:
        (folder / "probe").touch()
    except OSError:
        pass
    else:  # pragma: no cover - a file system that ignores both
        undo()
        pytest.skip("this file system lets us write into a read-only folder")
    yield folder
    undo()


OUTPUT_COMMANDS = ("train", "anomaly", "calibrate", "synthesize", "evaluate",
                   "evaluate-synthesis")


def output_command(command: str, out: Path, tmp_path: Path, ckpt: Path, synthetic: Path,
                   overwrite: bool = False) -> list:
    """A command that would succeed, writing to ``out``."""
    more = ["--overwrite"] if overwrite else []
    if command == "train":
        cfg = tiny_config(tmp_path, SAMPLE / "dataset.json")
        return ["train", "--config", cfg, "--out", out, "--no-progress", "--device", "cpu", *more]
    if command == "anomaly":
        return ["anomaly", "--checkpoint", ckpt, "--input", SOURCE, "--out", out, *FAST, *more]
    if command == "calibrate":
        return ["calibrate", "--checkpoint", ckpt, "--healthy", SOURCE, "--out", out, *METHOD,
                "--allow-few", *more]
    if command == "synthesize":
        return ["synthesize", "--checkpoint", ckpt, "--num", 2, "--out", out, "--steps", 2,
                "--no-progress", "--device", "cpu", *more]
    if command == "evaluate":
        (tmp_path / "t").mkdir(exist_ok=True)
        (tmp_path / "p").mkdir(exist_ok=True)
        truth = np.zeros((6, 6, 6), np.uint8)
        truth[2:4, 2:4, 2:4] = 1
        _save(truth, np.eye(4), tmp_path / "t" / "a.nii.gz")
        _save(np.random.default_rng(1).random((6, 6, 6), np.float32), np.eye(4),
              tmp_path / "p" / "a_anomaly.nii.gz")
        return ["evaluate", "--pred", tmp_path / "p", "--truth", tmp_path / "t", "--out", out,
                *more]
    return ["evaluate-synthesis", "--real", *HEALTHY[:2], "--synthetic", synthetic,
            "--out", out, "--max-pairs", 5, *more]


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
def test_read_only_output_folder(command, readonly_dir, run_cli, tmp_path, tiny_checkpoint_2d,
                                 synthetic_folder):
    name = {"calibrate": "t.json", "evaluate": "m.json", "evaluate-synthesis": "m.json"}
    for out in (readonly_dir / name.get(command, "new_folder"),) + (
            (readonly_dir,) if command not in name else ()):
        res = run_cli(output_command(command, out, tmp_path, tiny_checkpoint_2d,
                                     synthetic_folder))
        assert_one_clear_error(res, 1, str(readonly_dir))
        assert "cannot" in res.err
    assert list(readonly_dir.iterdir()) == []


def _existing_output(command: str, tmp_path: Path, ckpt: Path) -> Path:
    """An output that exists already and must not be replaced without --overwrite."""
    if command in ("calibrate", "evaluate", "evaluate-synthesis"):
        out = tmp_path / "existing.json"
        out.write_text('{"mine": true}\n', encoding="utf-8")
    elif command == "train":
        out = tmp_path / "run"
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "last.pt").write_bytes(b"an earlier run's state")
    elif command == "anomaly":  # outputs of another run (other seed)
        out = tmp_path / "out"
        out.mkdir()
        (out / "anomaly_config.json").write_text(json.dumps({"seed": 99}), encoding="utf-8")
        (out / "scores.csv").write_text("file,name,score\nx,x,1\n", encoding="utf-8")
    else:  # synthesize: samples of unknown configuration
        out = tmp_path / "synth"
        out.mkdir()
        (out / "synth_00000.nii.gz").write_bytes(SOURCE.read_bytes())
    return out


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
def test_existing_output_needs_overwrite(command, run_cli, tmp_path, tiny_checkpoint_2d,
                                         synthetic_folder):
    out = _existing_output(command, tmp_path, tiny_checkpoint_2d)
    files = sorted(p for p in ([out] if out.is_file() else out.rglob("*")) if p.is_file())
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    res = run_cli(output_command(command, out, tmp_path, tiny_checkpoint_2d, synthetic_folder))
    assert_one_clear_error(res, 1, str(out), "--overwrite")
    after = sorted(p for p in ([out] if out.is_file() else out.rglob("*")) if p.is_file())
    assert after == files and {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in after} == before
    assert not temporaries(tmp_path)
    if command in ("evaluate", "evaluate-synthesis", "calibrate"):  # --overwrite replaces it
        res = run_cli(output_command(command, out, tmp_path, tiny_checkpoint_2d,
                                     synthetic_folder, overwrite=True))
        assert res.rc == 0, res.err
        assert "mine" not in out.read_text(encoding="utf-8")


# ---- batch resilience ----------------------------------------------------------------------


def _mixed_folder(tmp_path: Path, good: list[Path]) -> tuple[Path, list[Path]]:
    """A folder of good scans plus one of each bad kind that a folder listing picks up."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i, path in enumerate(good):
        shutil.copy(path, folder / f"good{i}.nii.gz")
    bad = []
    for kind in ("truncated_gzip", "4d", "2d", "nan_inf", "constant", "zero_byte", "not_image"):
        made = make_volume_case(kind, tmp_path / "bad" / kind)
        target = folder / f"bad_{kind}.nii.gz"
        shutil.move(made, target)
        bad.append(target)
    return folder, bad


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_anomaly_batch_skips_bad_inputs(run_cli, tmp_path, tiny_checkpoint_2d):
    folder, bad = _mixed_folder(tmp_path, [SOURCE])
    out = tmp_path / "out"
    res = run_cli(["anomaly", "--checkpoint", tiny_checkpoint_2d, "--input", folder, "--out",
                   out, *FAST])
    assert res.rc == 4 and "Traceback" not in res.err
    lines = error_lines(res.err)
    assert len(lines) == len(bad)  # one line per bad input, each naming it
    for path in bad:
        assert sum(path.name in line for line in lines) == 1, path
    assert f"{len(bad)} of {len(bad) + 1} input(s) failed and were skipped" in res.err
    for path in bad:  # the summary lists every failure
        assert f"  {path}" in res.err.splitlines()
    assert [r["name"] for r in _rows(out / "scores.csv")] == ["good0"]
    assert sorted(p.name for p in out.iterdir()) == [
        "anomaly_config.json", "good0_anomaly.nii.gz", "good0_recon.nii.gz", "scores.csv",
        "scores.json"]


def test_calibrate_batch_skips_bad_inputs(run_cli, tmp_path, tiny_checkpoint_2d):
    folder, bad = _mixed_folder(tmp_path, HEALTHY[:2])
    out = tmp_path / "thresholds.json"
    res = run_cli(["calibrate", "--checkpoint", tiny_checkpoint_2d, "--healthy", folder,
                   "--out", out, *METHOD, "--allow-few"])
    assert res.rc == 4 and "Traceback" not in res.err
    assert len(error_lines(res.err)) == len(bad)
    assert f"{len(bad)} of {len(bad) + 2} input(s) failed and were left out" in res.err
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["num_scans"] == 2 and sorted(data["scan_scores"]) == ["good0", "good1"]


def test_synthesize_repairs_damaged_samples_and_manifest(run_cli, tmp_path, tiny_checkpoint_2d,
                                                         synthetic_folder):
    """Synthesize's inputs are its own earlier files: a damaged sample is reported, deleted
    and generated again (the same sample: sample i depends only on seed + i); an unreadable
    manifest is rebuilt; the folder ends complete, so the exit status is 0."""
    from medidiff.io.volume import load_volume

    folder = tmp_path / "s"
    shutil.copytree(synthetic_folder, folder)
    reference = load_volume(folder / "synth_00001.nii.gz").array
    (folder / "synth_00001.nii.gz").write_bytes(b"\x1f\x8b damaged")
    (folder / "manifest.csv").write_bytes(b"\x00\xff\xfe not a csv")
    kept = {n: (folder / n).stat().st_ino for n in ("synth_00000.nii.gz", "synth_00002.nii.gz")}
    res = run_cli(["synthesize", "--checkpoint", tiny_checkpoint_2d, "--num", 4, "--out",
                   folder, "--steps", 2, "--batch-size", 4, "--device", "cpu", "--no-progress"])
    assert res.rc == 0 and "Traceback" not in res.err
    warnings = [line for line in res.err.splitlines() if line.startswith("medidiff: warning:")]
    assert len(warnings) == 2 and "synth_00001.nii.gz: damaged" in warnings[0]
    assert "manifest.csv" in warnings[1]
    assert "1 sample(s) generated, 3 already present" in res.out
    # same noise (seed + 1); a batch of one may round differently in the last bits
    again = load_volume(folder / "synth_00001.nii.gz").array
    np.testing.assert_allclose(again, reference, rtol=0, atol=1e-5 * float(np.ptp(reference)))
    assert {n: (folder / n).stat().st_ino for n in kept} == kept
    assert [r["file"] for r in _rows(folder / "manifest.csv")] == [
        f"synth_{i:05d}.nii.gz" for i in range(4)]


def test_synthesize_bad_label_writes_nothing(run_cli, tmp_path, tiny_checkpoint_2d):
    out = tmp_path / "s"
    res = run_cli(["synthesize", "--checkpoint", tiny_checkpoint_2d, "--num", 2, "--out", out,
                   "--label", "tumor", "--no-progress"])
    assert_one_clear_error(res, 1, "--label", "unconditional")
    assert not out.exists()


def test_anomaly_removes_temporaries_a_killed_run_left(run_cli, tmp_path, tiny_checkpoint_2d):
    """A SIGKILL during an atomic write leaves a hidden temporary; the next run deletes
    those of its own outputs and nothing else."""
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".case_anomaly.nii.gz.k3j9x_1a.tmp.nii.gz",
             out / ".scores.csv.q0w9e8r7.tmp.csv", out / ".case_overlay.png.zz11yy22.tmp.png"]
    foreign = [out / ".notes.tmp.txt", out / "keep.txt"]
    for path in stale + foreign:
        path.write_bytes(b"partial")
    res = run_cli(["anomaly", "--checkpoint", tiny_checkpoint_2d, "--input", SOURCE, "--out",
                   out, *FAST])
    assert res.rc == 0, res.err
    assert not any(p.exists() for p in stale) and all(p.exists() for p in foreign)
