"""Fault injection (issue 7): real processes killed with SIGKILL or interrupted with SIGINT.

- ``medidiff train`` killed at random steps (three times), resumed each time, ends with
  weights, optimiser and EMA state bit-identical to an uninterrupted run on the CPU.
- ``medidiff synthesize`` and ``medidiff anomaly`` killed mid-run: every file present is
  complete (writes are atomic), rerunning finishes the rest, and the finished files are not
  redone (same inode and mtime).
- Ctrl-C (SIGINT) exits with status 130 and one line on stderr, no traceback.

Starting Python and importing torch + MONAI costs ~5-10 s per process on the CI machines, so
most runs are forked from one "fork server" process that has imported medidiff once: each
run is still a separate process (its own PID, killed by the kernel mid-work) running
``medidiff.cli.main.main`` from a pristine interpreter state. One test runs the real
``python -m medidiff`` entry point.
"""

from __future__ import annotations

import csv
import json
import os
import re
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
MESSAGE = ("medidiff: error: interrupted (Ctrl-C); finished outputs are kept, unfinished ones "
           "were not written")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork/POSIX signals"),
    pytest.mark.skipif(not (SAMPLE / "dataset.json").exists(), reason="sample_data not built"),
]


def assert_only_interrupt_message(err: str) -> None:
    """stderr after Ctrl-C: the one interrupt line last, before it at most plain progress
    lines ("scoring: 1/4 scans in 2s"), never a traceback."""
    lines = err.splitlines()
    assert lines and lines[-1] == MESSAGE, err
    assert all(re.match(r"^[\w ()-]+: \d+/\d+ ", line) for line in lines[:-1]), err
    assert "Traceback" not in err


# The fork server: reads one JSON request per line on stdin, answers one JSON line.
#   {"op": "run", "argv": [...], "cwd": ..., "stdout": file, "stderr": file} -> {"pid": N}
#   {"op": "wait", "pid": N, "timeout": s} -> {"rc": exit status, -signal, or null on timeout}
SERVER = r"""
import json, os, signal, sys, time
import medidiff.cli.main, medidiff.training.trainer, medidiff.data.datasets, medidiff.synthesis.synthesizer, medidiff.anomaly.detector
import medidiff.viz.overlay

reply = sys.stdout
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "run":
        pid = os.fork()
        if pid == 0:  # the child: one medidiff command, then exit without cleanup handlers
            rc = 99
            try:
                os.chdir(req["cwd"])
                for fd, name in ((1, req["stdout"]), (2, req["stderr"])):
                    f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd)
                    os.close(f)
                rc = medidiff.cli.main.main(req["argv"])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(rc)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
    elif req["op"] == "wait":
        deadline = time.monotonic() + req["timeout"]
        while True:
            done, status = os.waitpid(req["pid"], os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(req["pid"], signal.SIGKILL)
                os.waitpid(req["pid"], 0)
                rc = None
                break
            time.sleep(0.02)
        reply.write(json.dumps({"rc": rc}) + "\n")
        reply.flush()
"""


def _default_sigint() -> None:  # so that Python installs its Ctrl-C handler in the child
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONFAULTHANDLER": "1"}


@dataclass
class Child:
    """One medidiff process started by the fork server."""

    pid: int
    stdout: Path
    stderr: Path

    def out(self) -> str:
        return self.stdout.read_text(encoding="utf-8", errors="replace")

    def err(self) -> str:
        return self.stderr.read_text(encoding="utf-8", errors="replace")


class ForkServer:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.count = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=_env(), preexec_fn=_default_sigint, cwd=str(ROOT),
        )

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit {self.proc.poll()})")
        return json.loads(line)

    def start(self, argv: list, cwd: Path) -> Child:
        self.count += 1
        child = Child(0, self.logs / f"{self.count}.out", self.logs / f"{self.count}.err")
        child.pid = self._ask({"op": "run", "argv": [str(a) for a in argv], "cwd": str(cwd),
                               "stdout": str(child.stdout), "stderr": str(child.stderr)})["pid"]
        return child

    def wait(self, child: Child, timeout: float = 180) -> int | None:
        return self._ask({"op": "wait", "pid": child.pid, "timeout": timeout})["rc"]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ForkServer(tmp_path_factory.mktemp("forkserver_logs"))
    yield srv
    srv.close()


def wait_for(condition, child: Child, timeout: float = 120, what: str = "") -> None:
    """Poll ``condition()`` every 10 ms; fail with the child's stderr after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}; stderr: {child.err()[-2000:]}")


def kill(server: ForkServer, child: Child, sig: int = signal.SIGKILL) -> int | None:
    os.kill(child.pid, sig)
    return server.wait(child, timeout=60)


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if ".tmp" in p.name]


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def stamps(paths) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) per file name: both change if a file is written again."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


# ---- training ------------------------------------------------------------------------------


def train_config(folder: Path) -> Path:
    """configs/tiny_test.yaml on two training scans, a checkpoint every step."""
    images = sorted((SAMPLE / "train" / "images").glob("*.nii.gz"))[:2]
    datalist = folder / "datalist.csv"
    datalist.write_text("image\n" + "".join(f"{p}\n" for p in images), encoding="utf-8")
    text = (ROOT / "configs" / "tiny_test.yaml").read_text(encoding="utf-8")
    text = text.replace("datalist: ../sample_data/dataset.json", f"datalist: {datalist}")
    path = folder / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def train_argv(cfg: Path, out: Path, max_steps: int, resume: bool = False) -> list:
    return ["train", "--config", cfg, "--out", out, "--no-progress", "--device", "cpu",
            "--set", f"train.max_steps={max_steps}", "--set", "train.checkpoint_every=1",
            "--set", "train.batch_size=4", "--set", "train.log_every=1",
            "--set", "train.preview_every=0", *(["--resume"] if resume else [])]


def test_train_killed_at_random_steps_resumes_bit_identically(server, tmp_path):
    import torch
    from safetensors.torch import load_file

    from medidiff.models.training_state import load_training_state

    steps = 16
    cfg = train_config(tmp_path)
    reference = server.start(train_argv(cfg, tmp_path / "reference", steps), tmp_path)
    assert server.wait(reference) == 0, reference.err()

    run = tmp_path / "killed"
    metrics = run / "metrics.csv"
    rng = random.Random(2024)  # fixed, so a failure can be replayed
    for attempt in range(3):
        logged = len(_rows(metrics))
        extra = rng.randint(1, 3)  # SIGKILL once this process has done 1-3 steps
        child = server.start(train_argv(cfg, run, steps, resume=attempt > 0), tmp_path)
        wait_for(lambda: len(_rows(metrics)) >= logged + extra, child, what="training steps")
        assert kill(server, child) == -signal.SIGKILL
        state = load_training_state(run / "checkpoints" / "last.pt")
        assert 1 <= state["step"] < steps, "the kill must land mid-run"
    final = server.start(train_argv(cfg, run, steps, resume=True), tmp_path)
    assert server.wait(final) == 0, final.err()
    assert "(from 0)" not in final.out()

    a = load_file(str(tmp_path / "reference" / "model.safetensors"))
    b = load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "EMA weights differ after kill + resume"
    sa = load_training_state(tmp_path / "reference" / "checkpoints" / "last.pt")
    sb = load_training_state(run / "checkpoints" / "last.pt")
    assert sa["step"] == sb["step"] == steps
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    for group_a, group_b in zip(sa["optimizer"]["state"].values(),
                                sb["optimizer"]["state"].values()):
        assert all(torch.equal(group_a[k], group_b[k]) for k in ("exp_avg", "exp_avg_sq"))


def test_ctrl_c_on_the_real_entry_point(tmp_path):
    """``python -m medidiff train`` interrupted with SIGINT mid-training: exit 130, one line,
    and the run resumes from its last checkpoint."""
    cfg = train_config(tmp_path)
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "medidiff", *map(str, train_argv(cfg, run, 10_000))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), preexec_fn=_default_sigint, cwd=str(tmp_path))
    deadline = time.monotonic() + 180
    while len(_rows(run / "metrics.csv")) < 3 and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training stopped early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # SIGABRT: faulthandler prints every thread's stack
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"still running 60 s after SIGINT: {err[-5000:]}")
    assert proc.returncode == 130, err
    assert_only_interrupt_message(err)
    assert not temporaries(run)
    # everything finished before the interrupt is usable
    from medidiff.models.checkpoint import load_inference
    from medidiff.models.training_state import load_training_state

    assert load_training_state(run / "checkpoints" / "last.pt")["step"] >= 1
    load_inference(run / "model.safetensors")


# ---- synthesize ------------------------------------------------------------------------------


def test_synthesize_killed_then_rerun_completes(server, tmp_path, tiny_checkpoint_2d):
    from medidiff.io.volume import load_volume
    from medidiff.synthesis.synthesizer import Synthesizer

    out = tmp_path / "synth"
    num = 40
    argv = ["synthesize", "--checkpoint", tiny_checkpoint_2d, "--num", num, "--out", out,
            "--steps", 10, "--batch-size", 1, "--seed", 5, "--device", "cpu", "--no-progress"]
    child = server.start(argv, tmp_path)
    wait_for(lambda: len(list(out.glob("synth_*.nii.gz"))) >= 4, child, what="4 samples")
    assert kill(server, child) == -signal.SIGKILL
    present = sorted(out.glob("synth_*.nii.gz"))
    assert 4 <= len(present) < num, "the kill must land mid-run"
    for path in present:  # atomic writes: whatever is there is complete
        assert load_volume(path).shape == (32, 40, 1)
    before = stamps(present)

    again = server.start(argv, tmp_path)
    assert server.wait(again) == 0, again.err()
    summary = f"{num - len(present)} sample(s) generated, {len(present)} already present"
    assert summary in again.out()
    assert again.err() == ""
    assert stamps(out.glob("synth_*.nii.gz")).items() >= before.items()  # not redone
    assert len(list(out.glob("synth_*.nii.gz"))) == num and not temporaries(out)
    rows = _rows(out / "manifest.csv")
    assert [int(r["index"]) for r in rows] == list(range(num))
    # and the samples are those of an uninterrupted run (sample i depends on seed + i only)
    synth = Synthesizer(tiny_checkpoint_2d, device="cpu", steps=10, batch_size=1)
    for s in synth.generate([0, len(present) - 1, num - 1], seed=5):
        written = load_volume(out / f"synth_{s.index:05d}.nii.gz").array
        np.testing.assert_allclose(written, s.volume.array, rtol=0,
                                   atol=1e-5 * float(np.ptp(s.volume.array)))


# ---- anomaly ---------------------------------------------------------------------------------


def _inputs(folder: Path, n: int) -> Path:
    folder.mkdir()
    images = sorted((SAMPLE / "test" / "images").glob("*.nii.gz"))
    for i in range(n):
        shutil.copy(images[i % len(images)], folder / f"scan{i}.nii.gz")
    return folder


def test_anomaly_killed_then_rerun_completes(server, tmp_path, tiny_checkpoint_2d):
    from medidiff.io.volume import load_volume

    inputs = _inputs(tmp_path / "inputs", 5)
    out = tmp_path / "out"
    argv = ["anomaly", "--checkpoint", tiny_checkpoint_2d, "--input", inputs, "--out", out,
            "--method", "ddim", "--t-start", 6, "--steps", 2, "--device", "cpu"]
    child = server.start(argv, tmp_path)
    wait_for(lambda: len(_rows(out / "scores.csv")) >= 2, child, what="2 scored scans")
    assert kill(server, child) == -signal.SIGKILL
    done = [r["name"] for r in _rows(out / "scores.csv")]
    assert 2 <= len(done) < 5, "the kill must land mid-run"
    finished = [p for p in out.iterdir() if p.name.endswith(".nii.gz") and p.name[0] != "."]
    for path in finished:  # atomic writes: whatever is there is complete
        assert load_volume(path).shape == (96, 112, 96)
    before = stamps(p for p in out.iterdir() if p.name.split("_")[0] in done)
    assert len(before) == 3 * len(done)  # anomaly, recon, overlay of each finished scan

    again = server.start(argv, tmp_path)
    assert server.wait(again) == 0, again.err()
    assert f"resumed: {len(done)} scan(s) already had outputs" in again.out()
    after = stamps(out.iterdir())
    assert {k: after[k] for k in before} == before  # finished scans not redone
    assert [r["name"] for r in _rows(out / "scores.csv")] == [f"scan{i}" for i in range(5)]
    assert len([n for n in after if n.endswith("_anomaly.nii.gz")]) == 5
    assert not temporaries(out)


@pytest.mark.parametrize("command", ["anomaly", "synthesize"])
def test_ctrl_c_mid_run(command, server, tmp_path, tiny_checkpoint_2d):
    out = tmp_path / "out"
    if command == "anomaly":
        argv = ["anomaly", "--checkpoint", tiny_checkpoint_2d, "--input",
                _inputs(tmp_path / "inputs", 4), "--out", out, "--method", "ddim",
                "--t-start", 6, "--steps", 2, "--device", "cpu"]
        started = lambda: len(_rows(out / "scores.csv")) >= 1  # noqa: E731
    else:
        argv = ["synthesize", "--checkpoint", tiny_checkpoint_2d, "--num", 200, "--out", out,
                "--steps", 10, "--batch-size", 1, "--device", "cpu", "--no-progress"]
        started = lambda: len(list(out.glob("synth_*.nii.gz"))) >= 2  # noqa: E731
    child = server.start(argv, tmp_path)
    wait_for(started, child, what="the first outputs")
    assert kill(server, child, signal.SIGINT) == 130, child.err()
    assert_only_interrupt_message(child.err())
    assert not temporaries(out)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc")
@pytest.mark.parametrize("when", ["workers-starting", "workers-scoring"])
def test_ctrl_c_to_the_process_group_with_worker_processes(when, tmp_path, tiny_checkpoint_2d):
    """A terminal's Ctrl-C reaches the whole foreground group, workers included: exit 130,
    our one line and nothing else on stderr (no worker traceback, no resource-tracker
    warning about leaked semaphores), and no process of the group left behind."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "medidiff", "anomaly", "--checkpoint", str(tiny_checkpoint_2d),
            "--input", str(_inputs(tmp_path / "inputs", 6)), "--out", str(out), "--workers", "2",
            "--method", "ddim", "--t-start", "6", "--steps", "2", "--device", "cpu"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), preexec_fn=_default_sigint, start_new_session=True,
                            cwd=str(tmp_path))
    if when == "workers-starting":  # a worker exists and is still importing PyTorch
        started = lambda: any("spawn_main" in c for c in _group(proc.pid))  # noqa: E731
    else:
        started = lambda: len(_rows(out / "scores.csv")) >= 1  # noqa: E731
    deadline = time.monotonic() + 180
    while not started():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {when} seen: {proc.communicate()[1][-2000:]}")
        time.sleep(0.005)
    time.sleep(0.2)  # past the milliseconds in which the worker is forked (Ctrl-C ignored)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running 60 s after Ctrl-C: {proc.communicate()[1][-3000:]}")
    assert proc.returncode == 130, err
    assert_only_interrupt_message(err)
    deadline = time.monotonic() + 30
    while (left := _group(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left in the group: {left}"


def _group(pgid: int) -> list[str]:
    """Command lines of the live (not zombie) processes of a process group."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append((stat.parent / "cmdline").read_text().replace("\0", " "))
        except (OSError, IndexError, ValueError):
            continue
    return found
