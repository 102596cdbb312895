"""Analog SGD on every backend against the reference (the harness and its policy: ``kernel_harness.py``)."""

from __future__ import annotations

import pytest
import torch
from kernel_harness import (
    BACKEND_NAMES,
    DEVICE_OPTIONS,
    FAMILIES,
    LAYOUTS,
    OFFSETS,
    ZERO_GRADIENT_CASES,
    Entry,
    bad_input_names,
    check_bad_input,
    check_counter_layout,
    check_shards_equal_whole,
    check_steps_draw_anew,
    check_zero_gradient_blocks,
    compare,
    compare_group,
    make_config,
    make_device,
    total_pairs,
    total_pulses,
    use_backend,
)

import fastanalog as fa
from fastanalog.config import PULSE_LIMIT

ALGORITHM = "asgd"



@pytest.fixture(params=BACKEND_NAMES)
def backend(request, monkeypatch):
    """Every backend in turn (skipped where it cannot run here)."""
    return use_backend(request.param, monkeypatch)


def config(family: str = "power", **options) -> fa.AnalogConfig:
    """A config of this algorithm on a device of ``family``; device options (d2d_std, c2c_std, ...) go to the device."""
    device_options = {k: options.pop(k) for k in ("d2d_std", "c2c_std", "asymmetry", "variation_seed") if k in options}
    return make_config(ALGORITHM, make_device(family, **device_options), **options)


@pytest.mark.parametrize("n", [1, 3, 5, 1023, 4099])
def test_odd_sizes(backend, n):
    results = compare(backend, config(d2d_std=0.2, c2c_std=0.2, asymmetry=0.1), n, steps=2)
    assert total_pulses(results) > 0


@pytest.mark.parametrize("options", list(DEVICE_OPTIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_families(backend, family, options):
    results = compare(backend, config(family, **DEVICE_OPTIONS[options]), 331, steps=2)
    assert total_pulses(results) > 0 and total_pairs(results) > 0


@pytest.mark.parametrize("kind", ["above", "equal", "below", "zeros", "mixed"])
def test_excess(backend, kind):
    results = compare(backend, config(c2c_std=0.2, asymmetry=0.1), 331, steps=1, excess=kind)
    pairs = total_pairs(results)
    assert pairs > 0 if kind in ("above", "mixed") else pairs == 0


@pytest.mark.parametrize("kind", ["above", "mixed", "zeros"])
def test_excess_on_a_nominal_device(backend, kind):
    """No variation, no c2c: the C++ kernels' one-pass path of a power write with pairs (tails of 8-lane vectors too)."""
    results = compare(backend, config(asymmetry=0.1), 1031, steps=2, excess=kind)
    pairs = total_pairs(results)
    assert pairs > 0 if kind != "zeros" else pairs == 0


@pytest.mark.parametrize("a_dtype,kind", [(torch.bfloat16, "equal"), (torch.float16, "above")])
def test_excess_in_reduced_precision(backend, a_dtype, kind):
    # A in a narrower dtype than g: "equal" is |g| rounded, on either side of |g| (a tiny excess or none).
    results = compare(backend, config(c2c_std=0.2), 331, steps=1, excess=kind, excess_dtype=a_dtype)
    assert total_pairs(results) > 0 if kind == "above" else total_pulses(results) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(backend, dtype):
    results = compare(backend, config(d2d_std=0.1, c2c_std=0.2), 331, steps=2, dtype=dtype)
    assert total_pulses(results) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_gradient_of_half_array(backend, dtype):
    compare(backend, config(c2c_std=0.1), 331, steps=1, dtype=dtype, grad_dtype=torch.float32, excess="mixed")


def test_max_pulses(backend):
    results = compare(backend, config(c2c_std=0.1, max_pulses=3), 331, steps=1, grad_scale=3.0, excess="mixed")
    assert max(int(want.first.abs().max()) for _, want in results) == 3, "the cap must bind"


def test_huge_lr_saturates_at_the_pulse_limit(backend):
    results = compare(backend, config("linear"), 33, steps=1, lr=1e6, excess="none")
    assert max(int(want.first.abs().max()) for _, want in results) == PULSE_LIMIT


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_non_contiguous(backend, layout):
    shape, make = LAYOUTS[layout]
    results = compare(backend, config(c2c_std=0.2), shape, steps=2, layout=make)
    assert total_pulses(results) > 0


# Gradients giving about 1% and 10% of the elements a pulse (the others none): kernels that evaluate
# responses only where an element pulses, or per vector holding one, take other paths than at 100%.
@pytest.mark.parametrize("grad_scale", [0.001, 0.01])
@pytest.mark.parametrize("family", ["power", "exp"])
def test_sparse_writes(backend, family, grad_scale):
    results = compare(backend, config(family, c2c_std=0.1), 2053, steps=1, excess="none", grad_scale=grad_scale)
    written = sum(int((want.first != 0).sum()) for _, want in results)
    assert 0 < written < 0.2 * 2053


# Gradients (and A) zero but for a few elements: whole blocks without a pulse, whose rounding
# numbers the C++ kernels do not draw (nor, for asgd, store W where it stays).
@pytest.mark.parametrize("family,dtype,options,excess", ZERO_GRADIENT_CASES)
def test_zero_gradient_blocks(backend, family, dtype, options, excess):
    check_zero_gradient_blocks(backend, config(family, **options), dtype, excess)


def test_steps_draw_anew(backend):
    check_steps_draw_anew(backend, config(d2d_std=0.2, c2c_std=0.2))


@pytest.mark.parametrize("shape", [(0,), (0, 3)])
def test_empty(backend, shape):
    results = compare(backend, config(c2c_std=0.2), shape, steps=2)
    assert all(got.first.numel() == 0 for got, _ in results)


@pytest.mark.parametrize("totals", [False, True])
def test_group(backend, totals):
    # One config object shared by three tensors (one empty) and an equal but distinct one (one launch), another
    # config in bfloat16 (no mixed weight for rl/rl2) and another algorithm, with and without A:
    # each tensor gets what the oracle, and analog_step alone, give it.
    a = config(d2d_std=0.1, c2c_std=0.2)
    entries = [
        Entry(a, 1, tensor_id=0, excess="mixed"),
        Entry(a, 0, tensor_id=8, excess="mixed"),
        Entry(a, (5, 7), tensor_id=4, excess="mixed"),
        Entry(config(d2d_std=0.1, c2c_std=0.2), 331, tensor_id=9, excess="mixed"),
        Entry(config("table", asymmetry=0.1), 17, dtype=torch.bfloat16, tensor_id=5),
        Entry(make_config("rl2", make_device("exp")), 19, tensor_id=6),
    ]
    wants = compare_group(backend, entries, totals=totals, alone=not totals)
    assert sum(int(w.first_total()) for w in wants) > 0


@pytest.mark.parametrize("name", bad_input_names(ALGORITHM))
def test_bad_input(request, backend, name):
    check_bad_input(request, backend, config(), name)


# ----- the reference at global offsets (op-level offsets: test_cpp_step.py, test_triton_step.py) ------------
@pytest.mark.parametrize("offset", OFFSETS)
def test_offset_shards_equal_whole(offset):
    check_shards_equal_whole(config("table", d2d_std=0.2, c2c_std=0.2), offset)


@pytest.mark.parametrize("offset", OFFSETS)
def test_offset_counter_layout(offset):
    check_counter_layout(config("linear"), offset)
