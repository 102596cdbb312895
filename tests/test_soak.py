"""Soak test of ``fastanalog train``'s checkpoints: a run killed with SIGKILL again and again, resumed each time.

A small noisy rl2 run (mlp on digits, device-to-device variation, cycle-to-cycle and read noise, momentum,
cosine schedule; 34 steps, a checkpoint every 2 steps and at the epoch end, a metrics row every 3) is
started as its own process (``python -m fastanalog train``), killed with SIGKILL at seeded random points
``KILLS`` times and resumed with ``--resume RUN_FOLDER`` after each kill; a process killed before the
first checkpoint exists is started afresh (``--out RUN_FOLDER --overwrite``). The kill points are of five
kinds (``KILL_MODES``): during the start-up (imports, data, ``_prepare_folder``), a random delay after
training started, right after a metrics row was printed (its CSV rows and the checkpoint come next), while
a checkpoint's temporary file exists (the write of ``checkpoints/step-N.pt`` before its rename) and while a
temporary file of another run file exists (a plot, ``config.json``, a truncated ``metrics.csv``). Every
mode but the start-up one waits for progress past the resumed checkpoint, so the run advances. A last kill
comes right after the final checkpoint, before ``summary.json``; the last resume then only evaluates.

After every kill the latest checkpoint must load (checksum included) and be no older than before; every
resume must start (a failed resume fails the test with its output). At the end the final checkpoint must
equal, bit for bit (``torch.equal``), that of an uninterrupted run of the same options (run at the same
time): every entry of the model state (``weight``, ``analog_residual``, ``analog_buffer``,
``analog_scale``, ``analog_pulses``, ``analog_last_pulses``, biases), the optimizer (momentum buffers,
``AnalogSGD``'s seed and step counter), the scheduler, the position, the running meters and the generator
states; so must ``summary.json``'s results. ``metrics.csv`` and ``diagnostics.csv`` must hold one complete
row per logged step (per layer), with no step duplicated or missing (the steps are the multiples of
``--log-every`` and the epoch ends), equal to the uninterrupted run's cell for cell (``images_per_s``, a
throughput, aside); no temporary file may be left; ``config.json`` keeps the run's options and one entry per
resume that got going.

About 2 minutes on 2 cores, 3.5 when other work shares them (most of it the start-up of the 13 processes);
every process has a timeout and the whole soak a deadline (DEADLINE_S).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fastanalog.train.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# 272 digits in batches of 16: 17 steps per epoch, 34 in all (the epoch end, step 17, is neither a
# multiple of --checkpoint-every nor of --log-every: it adds a checkpoint and a row of its own).
STEPS_PER_EPOCH, EPOCHS = 17, 2
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
CHECKPOINT_EVERY, LOG_EVERY = 2, 3
OPTIONS = (
    "--model mlp --dataset digits --max-train 272 --max-test 64 --batch-size 16 --epochs 2 "
    "--algorithm rl2 --d2d-std 0.1 --c2c-std 0.2 --read-noise 0.01 --lr 0.05 --momentum 0.5 --schedule cosine "
    f"--checkpoint-every {CHECKPOINT_EVERY} --log-every {LOG_EVERY} --accelerator cpu --threads 1"
).split()
SEED = 1729
# Kills at random points; one more ("end") follows them, right after the last checkpoint (before summary.json).
KILLS = 10
# Kinds of kill points; each is used at least once, the rest are drawn at random (seeded).
KILL_MODES = ("startup", "delay", "row", "checkpoint-write", "file-write")
# Each process (start-up included) must be killed or end within this many seconds; the whole test has DEADLINE_S.
ROUND_TIMEOUT_S = 120
DEADLINE_S = 360
# Seconds between two looks at a process and its run folder; a checkpoint's temporary file lives for a few
# milliseconds (torch.save and fsync), so the "checkpoint-write" kills look without pausing.
POLL_S = 0.002
# A temporary file of an interrupted atomic write: ``.<name>.<8 characters>.tmp``.
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")
START_LINE = re.compile(r"^fastanalog train: .* from (?:step (\d+) of .*|scratch);")
PROGRESS_LINE = re.compile(r"^step (\d+)/\d+ \|")


def _env() -> dict[str, str]:
    """The environment of the training processes: that of a user's shell (conftest's TRITON_INTERPRET, which
    would route the CPU updates through the Triton interpreter, left out), one thread."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Launched:
    """A ``fastanalog train`` process whose output lines are collected (with their arrival time) by a thread."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.argv = argv
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastanalog", "train", *argv],
            cwd=cwd,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def start(self) -> tuple[float, int] | None:
        """``(time, step)`` of the start line (``from step N`` or ``from scratch``), None before it."""
        for t, line in list(self.lines):
            m = START_LINE.match(line)
            if m:
                return t, int(m.group(1) or 0)
        return None

    def progress_lines(self) -> int:
        return sum(1 for _, line in list(self.lines) if PROGRESS_LINE.match(line))

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.wait(30)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)[-4000:]


def _temporaries(run: Path) -> list[Path]:
    found = []
    for folder in (run, run / "checkpoints"):
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        found += [folder / name for name in names if TEMPORARY.match(name)]
    return found


def _checkpoint_steps(run: Path) -> list[int]:
    try:
        names = os.listdir(run / "checkpoints")
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(CHECKPOINT_NAME.match, names) if m)


def _temporary_checkpoint_steps(run: Path) -> list[int]:
    steps = []
    for path in _temporaries(run):
        if path.parent.name == "checkpoints":
            m = CHECKPOINT_NAME.match(TEMPORARY.match(path.name).group("name"))
            if m:
                steps.append(int(m.group(1)))
    return steps


def _kill_condition(mode: str, launched: Launched, run: Path, rng: random.Random):
    """A function that says when to kill ``launched`` (True) for kill point ``mode``; it reads the run folder."""
    delay = {"startup": rng.uniform(0.2, 6.0), "delay": rng.uniform(0.0, 1.5)}.get(mode, 0.0)
    rows = rng.choice([1, 2])
    if mode == "end":
        return lambda: TOTAL_STEPS in _checkpoint_steps(run)

    def fire() -> bool:
        now = time.monotonic()
        if mode == "startup":
            return now - launched.started >= delay
        start = launched.start()
        if start is None:
            return False
        t0, step0 = start
        if mode == "delay":
            return now - t0 >= delay
        if mode == "row":
            return launched.progress_lines() >= rows
        done = [s for s in _checkpoint_steps(run) if s > step0]
        if mode == "checkpoint-write":
            # While the second checkpoint after the resumed one is being written (or, if its temporary
            # file was missed, once the third exists: progress stays bounded).
            return any(s >= step0 + 2 * CHECKPOINT_EVERY for s in _temporary_checkpoint_steps(run)) or any(
                s >= step0 + 3 * CHECKPOINT_EVERY for s in done
            )
        if mode == "file-write":
            # While any run file is being written once a new checkpoint exists (plots, config.json, the CSVs).
            return bool(done) and (
                any(p.parent == run for p in _temporaries(run)) or max(done) >= step0 + 3 * CHECKPOINT_EVERY
            )
        raise ValueError(mode)

    return fire


def _kill_plan(rng: random.Random) -> list[str]:
    plan = [*KILL_MODES, "checkpoint-write", "checkpoint-write"]
    plan += [rng.choice(KILL_MODES[1:]) for _ in range(KILLS - len(plan))]
    rng.shuffle(plan)
    return [*plan, "end"]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _assert_same(a, b, where: str) -> None:
    """Element-for-element equality (``torch.equal`` and the same dtype for tensors) of nested containers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: {int((a != b).sum())} element(s) differ"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _logged_steps() -> list[int]:
    """The steps of the metrics rows: every LOG_EVERY steps and at each epoch end."""
    return sorted({s for s in range(1, TOTAL_STEPS + 1) if s % LOG_EVERY == 0 or s % STEPS_PER_EPOCH == 0})


def _check_log(soak: Path, reference: Path, name: str, per_step: int) -> int:
    """Compare one CSV log of the two runs; return its number of rows."""
    fields, rows = _read_csv(soak / name)
    ref_fields, ref_rows = _read_csv(reference / name)
    assert fields == ref_fields
    for r in rows:  # complete rows only: no cut-off line of a killed append
        assert None not in r and all(v is not None for v in r.values()), r
    steps = [int(r["step"]) for r in rows]
    expected = [s for s in _logged_steps() for _ in range(per_step)]
    assert steps == expected, f"{name}: steps {steps}, expected {expected}"
    assert [int(r["step"]) for r in ref_rows] == expected

    def cells(rs):
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rs]

    assert cells(rows) == cells(ref_rows), f"{name} differs from the uninterrupted run's"
    return len(rows)


def test_sigkill_soak_resumes_to_the_uninterrupted_trajectory(tmp_path: Path) -> None:
    begin = time.monotonic()
    rng = random.Random(SEED)
    plan = _kill_plan(rng)
    reference_dir, run = tmp_path / "reference", tmp_path / "soak"
    reference = Launched([*OPTIONS, "--out", str(reference_dir)], tmp_path)

    kills: list[dict] = []
    launched_all = [reference]
    launches = resumes = 0
    resumes_started: list[bool] = []  # per resume since the last fresh start: did it train (print a row)?
    try:
        while True:
            assert time.monotonic() - begin < DEADLINE_S, f"the soak ran past {DEADLINE_S} s; kills so far: {kills}"
            assert launches < 3 * KILLS, f"{launches} launches without finishing; kills: {kills}"
            resuming = bool(_checkpoint_steps(run))
            if resuming:
                argv = ["--resume", str(run)]
                resumes += 1
            else:  # killed before its first checkpoint (or not started yet): start afresh
                argv = [*OPTIONS, "--out", str(run), "--overwrite"]
                resumes_started = []
            before = _checkpoint_steps(run)
            launched = Launched(argv, tmp_path)
            launched_all.append(launched)
            launches += 1
            mode = plan[len(kills)] if len(kills) < len(plan) else None
            fire = _kill_condition(mode, launched, run, rng) if mode is not None else (lambda: False)
            deadline = launched.started + ROUND_TIMEOUT_S
            seen: list[str] = []
            while launched.proc.poll() is None:
                if time.monotonic() > deadline:
                    launched.kill()
                    pytest.fail(f"{' '.join(argv)} ran past {ROUND_TIMEOUT_S} s:\n{launched.output()}")
                if fire():
                    seen = [p.name for p in _temporaries(run)]
                    launched.kill()
                    break
                time.sleep(0 if mode == "checkpoint-write" else POLL_S)
            code = launched.wait(60)
            if resuming:
                resumes_started.append(launched.progress_lines() > 0)
            if code == -signal.SIGKILL:
                start = launched.start()
                steps = _checkpoint_steps(run)
                kills.append(
                    {
                        "mode": mode,
                        "from_step": start[1] if start else None,
                        "after_s": round(time.monotonic() - launched.started, 2),
                        "checkpoints": steps,
                        "temporaries_seen": seen,
                        "temporaries_left": [p.name for p in _temporaries(run)],
                        "summary": (run / "summary.json").exists(),
                    }
                )
                # The latest checkpoint is whole (its checksum is checked) and no older than before this process.
                if steps:
                    assert load_checkpoint(list_checkpoints(run)[-1][1])["step"] == steps[-1]
                assert not before or (steps and steps[-1] >= before[-1]), (before, steps)
                continue
            assert code == 0, f"{' '.join(argv)} exited with {code} (kill mode {mode}):\n{launched.output()}"
            assert mode is None, f"the run finished before kill {len(kills) + 1} ({mode}); kills: {kills}"
            finished = launched
            break
        assert reference.wait(ROUND_TIMEOUT_S) == 0, reference.output()
    finally:
        for p in launched_all:
            if p.proc.poll() is None:
                p.kill()

    elapsed = time.monotonic() - begin
    print(f"\nsoak: {len(kills)} kills, {launches} launches ({resumes} resumes), {elapsed:.1f} s")
    for k in kills:
        print(f"  {k}")

    # ----- the kills that happened
    assert [k["mode"] for k in kills] == plan and set(plan) == {*KILL_MODES, "end"}
    # The last kill came after the final checkpoint, before summary.json: the last process only evaluates.
    assert TOTAL_STEPS in kills[-1]["checkpoints"] and not kills[-1]["summary"], kills[-1]
    assert f"from step {TOTAL_STEPS} of" in finished.output()
    # At least one SIGKILL landed while a checkpoint's temporary file was being written: it was left behind.
    assert any(TEMPORARY.match(n) and n.startswith(".step-") for k in kills for n in k["temporaries_left"]), kills

    # ----- the final state, bit for bit
    final, ref = (load_checkpoint(list_checkpoints(d)[-1][1]) for d in (run, reference_dir))
    assert final["step"] == ref["step"] == TOTAL_STEPS
    arrays = ("weight", "analog_residual", "analog_buffer", "analog_scale", "analog_pulses", "analog_last_pulses")
    layers = sorted({k.rsplit(".", 1)[0] for k in ref["model"] if k.endswith(".analog_buffer")})
    assert len(layers) == 3
    for layer in layers:
        for array in arrays:
            key = f"{layer}.{array}"
            got, want = final["model"][key], ref["model"][key]
            assert torch.equal(got, want), f"{key}: {int((got != want).sum())} of {want.numel()} element(s) differ"
        assert int(final["model"][f"{layer}.analog_pulses"].sum()) > 0
    for key in ("model", "optimizer", "scheduler", "epoch", "batch", "meters", "rng"):
        _assert_same(final[key], ref[key], key)
    assert final["optimizer"]["fastanalog"]["step"] == TOTAL_STEPS
    assert len(final["optimizer"]["state"]) > 0  # momentum buffers compared above

    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run, reference_dir))
    for key in ("steps", "test_accuracy", "test_loss", "train_loss", "train_accuracy", "pulses", "rank_state_sha256"):
        assert summary[key] == ref_summary[key], key

    # ----- the logs: one complete row per logged step, equal to the uninterrupted run's
    assert _check_log(run, reference_dir, "metrics.csv", 1) == len(_logged_steps())
    _check_log(run, reference_dir, "diagnostics.csv", len(layers))

    # ----- the run folder: no temporary file left, config.json records the resumes that got going
    assert _temporaries(run) == []
    config = json.loads((run / "config.json").read_text())
    ref_config = json.loads((reference_dir / "config.json").read_text())
    ignored = ("out", "overwrite")
    assert {k: v for k, v in config["args"].items() if k not in ignored} == {
        k: v for k, v in ref_config["args"].items() if k not in ignored
    }
    assert sum(resumes_started) <= len(config["resumes"]) <= len(resumes_started)
    assert [r["step"] for r in config["resumes"]] == sorted(r["step"] for r in config["resumes"])
