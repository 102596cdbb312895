"""An algorithm is declared once (``reference.ALGORITHMS``) and every Python layer follows.

The config, the layers' arrays, the optimizer, the op schemas, the packing and the dispatch
read the declaration; adding an algorithm is its entry and rule in ops/reference.py, its id in
csrc/op_layout.h and one kernel per compiled backend. The last test proves the Python half: a
copy of the package whose only edit is one more entry in ops/reference.py trains with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastanalog as fa
from fastanalog.config import ALGORITHMS as CONFIG_ALGORITHMS
from fastanalog.ops import library, packing, reference

PACKAGE = Path(fa.__file__).resolve().parent


def test_every_part_lists_the_declared_algorithms():
    declared = tuple(reference.ALGORITHMS)
    assert declared == ("asgd", "rl", "rl2")
    assert CONFIG_ALGORITHMS == ("digital", *declared)
    assert library.ALGORITHMS == declared
    assert packing.ALGORITHM_IDS == {name: a.id for name, a in reference.ALGORITHMS.items()}
    assert {n[: -len("_step")] for n in library.SCHEMAS if not n.startswith("_")} == set(declared)
    for name in declared:
        assert hasattr(torch.ops.fastanalog, f"{name}_step")


@pytest.mark.parametrize("name", ["asgd", "rl", "rl2"])
def test_the_declaration_drives_the_config_and_the_op_schema(name):
    spec = reference.ALGORITHMS[name]
    config = fa.AnalogConfig(algorithm=name)
    assert config.has_residual == ("P" in spec.arrays) == spec.residual
    assert config.has_buffer == ("H" in spec.arrays) == spec.buffered
    schema = library.SCHEMAS[f"{name}_step"]
    arrays = [part.split()[-1] for part in schema.strip("(").split(", ") if part.startswith("Tensor(")]
    assert arrays[: len(spec.arrays)] == list(spec.arrays)
    assert ("Wbar" in arrays) == spec.residual


def test_unknown_algorithm_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown analog algorithm 'rl3'.*asgd, rl, rl2"):
        reference.algorithm("rl3")
    with pytest.raises(ValueError, match="unknown algorithm 'rl3'"):
        fa.AnalogConfig(algorithm="rl3")
    with pytest.raises(ValueError, match="unknown analog algorithm"):
        library.op("digital")


def test_step_flags_as_the_optimizer_sets_them():
    rl = fa.AnalogConfig(algorithm="rl", transfer_every=3)
    assert [reference.ALGORITHMS["rl"].step_flag(rl, k) for k in range(1, 7)] == [False, False, True, False, False, True]
    ema = fa.AnalogConfig(algorithm="rl2", buffer="ema", transfer_lr=0.5)
    assert reference.ALGORITHMS["rl2"].step_flag(ema, 1) is True
    assert reference.ALGORITHMS["rl2"].step_flag(fa.AnalogConfig(algorithm="rl2"), 1) is False
    assert reference.ALGORITHMS["asgd"].step_flag(fa.AnalogConfig(algorithm="asgd"), 5) is False


# The entry added to the copy: rl2's rule under a new name and id, with no compiled kernel yet.
TWIN = """\
        Algorithm(
            "rl2_twin", 7, ("W", "P", "H"), rl2_step_ref,
            step_flag=lambda config, k: config.buffer == "ema",
            writes_w=lambda flag: True,
            flag_config=lambda flag: {"buffer": "ema" if flag else "accumulate"},
            backends=("reference",),
        ),
"""

SCRIPT = """\
import torch
import fastanalog as fa
from fastanalog.ops import dispatch, library
from fastanalog.train.cli import ALGORITHMS as CLI_ALGORITHMS

assert "rl2_twin" in fa.config.ALGORITHMS and "rl2_twin" in CLI_ALGORITHMS
assert hasattr(torch.ops.fastanalog, "rl2_twin_step")


def train(algorithm):
    torch.manual_seed(0)
    device = fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.002, d2d_std=0.1)
    config = fa.AnalogConfig(algorithm=algorithm, device=device, gamma=0.2, read_noise=0.01)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 5))
    model = fa.convert_to_analog(model, config)
    opt = fa.AnalogSGD(model.parameters(), lr=0.05, seed=3)
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    layers = [layer for _, layer in fa.analog_layers(model)]
    return [(layer.analog_state(), layer.analog_pulses.clone()) for layer in layers]


W = torch.empty(4)
if library.backend_available("cpp"):
    assert dispatch.backend_for(W, "rl2") == "cpp"
assert dispatch.backend_for(W, "rl2_twin") == "reference"
twin = train("rl2_twin")
with dispatch.use_backend("reference"):
    rl2 = train("rl2")
for (s_twin, p_twin), (s_rl2, p_rl2) in zip(twin, rl2):
    assert set(s_twin) == {"main", "residual", "buffer"}, set(s_twin)
    for key in s_twin:
        assert torch.equal(s_twin[key], s_rl2[key]), key
    assert torch.equal(p_twin, p_rl2) and int(p_twin.sum()) > 0
if library.backend_available("cpp"):
    with dispatch.use_backend("cpp"):
        try:
            train("rl2_twin")
        except RuntimeError as exc:
            assert "no kernel for the algorithm 'rl2_twin'" in str(exc), exc
        else:
            raise AssertionError("FASTANALOG_BACKEND=cpp ran an algorithm it has no kernel for")
print("twin ok")
"""


def test_an_algorithm_added_in_the_reference_alone_trains(tmp_path):
    built = sorted(PACKAGE.glob("_C*.so"))
    if not built:
        pytest.skip("the compiled library is not built (the copy would build it on first use)")
    copy = tmp_path / "fastanalog"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "_C*.so"))
    for so in built:
        (copy / so.name).symlink_to(so)
    source = copy / "ops" / "reference.py"
    text = source.read_text()
    anchor = '            flag_config=lambda flag: {"buffer": "ema" if flag else "accumulate"},\n        ),\n'
    assert text.count(anchor) == 1, "the rl2 entry of ALGORITHMS moved: update this test's anchor"
    source.write_text(text.replace(anchor, anchor + textwrap.indent(textwrap.dedent(TWIN), " " * 8)))
    env = {k: v for k, v in os.environ.items() if k not in ("FASTANALOG_BACKEND", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "twin ok" in done.stdout


def test_declarations_are_checked():
    ids = [a.id for a in reference.ALGORITHMS.values()]
    assert len(set(ids)) == len(ids)
    assert all(name == a.name for name, a in reference.ALGORITHMS.items())
    with pytest.raises(ValueError, match="arrays must be"):
        reference.Algorithm("x", 9, ("W", "H"), reference.asgd_step_ref)
    with pytest.raises(ValueError, match="id must be an int >= 0"):
        reference.Algorithm("x", -1, ("W",), reference.asgd_step_ref)
    with pytest.raises(ValueError, match="backends must include 'reference'"):
        reference.Algorithm("x", 9, ("W",), reference.asgd_step_ref, backends=("cpp",))
