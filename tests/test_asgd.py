"""Analog SGD on every backend against the reference (the harness and its policy: ``kernel_harness.py``)."""

from __future__ import annotations

import pytest
import torch
from kernel_harness import (
    DEVICE_OPTIONS,
    FAMILIES,
    OFFSETS,
    Entry,
    bad_input_names,
    check_bad_input,
    check_counter_layout,
    check_shards_equal_whole,
    compare,
    compare_group,
    make_config,
    make_device,
    total_pairs,
    total_pulses,
)

import fastanalog as fa
from fastanalog.config import PULSE_LIMIT

pytest_plugins = ("kernel_harness",)  # the backend fixture
ALGORITHM = "asgd"


def config(family: str = "power", **options) -> fa.AnalogConfig:
    """A config of this algorithm on a device of ``family``; device options (d2d_std, c2c_std, ...) go to the device."""
    device_options = {k: options.pop(k) for k in ("d2d_std", "c2c_std", "asymmetry", "variation_seed") if k in options}
    return make_config(ALGORITHM, make_device(family, **device_options), **options)


@pytest.mark.parametrize("n", [1, 3, 5, 1023])
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


@pytest.mark.parametrize("kind", ["equal", "above"])
@pytest.mark.parametrize("a_dtype", [torch.bfloat16, torch.float16])
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
    compare(backend, config(c2c_std=0.1), 331, steps=2, dtype=dtype, grad_dtype=torch.float32)


def test_max_pulses(backend):
    results = compare(backend, config(c2c_std=0.1, max_pulses=3), 331, steps=2, grad_scale=3.0)
    assert max(int(want.first.abs().max()) for _, want in results) == 3, "the cap must bind"


def test_huge_lr_saturates_at_the_pulse_limit(backend):
    results = compare(backend, config("linear"), 33, steps=2, lr=1e6)
    assert max(int(want.first.abs().max()) for _, want in results) == PULSE_LIMIT


def _strided(t: torch.Tensor) -> torch.Tensor:
    base = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    view = base[..., 1::2]
    view.copy_(t)
    return view


LAYOUTS = {
    "strided": ((7, 11), _strided),
    "transposed": ((9, 13), lambda t: t.t().contiguous().t()),
    "channels_last": ((5, 3, 3, 3), lambda t: t.contiguous(memory_format=torch.channels_last)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_non_contiguous(backend, layout):
    shape, make = LAYOUTS[layout]
    results = compare(backend, config(d2d_std=0.1, c2c_std=0.2), shape, steps=2, layout=make)
    assert total_pulses(results) > 0


@pytest.mark.parametrize("shape", [(0,), (0, 3)])
def test_empty(backend, shape):
    results = compare(backend, config(c2c_std=0.2), shape, steps=2)
    assert all(got.first.numel() == 0 for got, _ in results)


@pytest.mark.parametrize("totals", [False, True])
def test_group(backend, totals):
    # Two configs (one object shared by two tensors, one equal but distinct), several sizes,
    # dtypes and tensor ids, with and without A: each tensor gets what analog_step gives it alone.
    a = config(d2d_std=0.1, c2c_std=0.2)
    b = config("table", asymmetry=0.1)
    entries = [
        Entry(a, 1, tensor_id=0),
        Entry(a, (5, 7), tensor_id=4, excess="mixed"),
        Entry(config(d2d_std=0.1, c2c_std=0.2), 33, tensor_id=9),
        Entry(b, 331, tensor_id=2, excess="mixed"),
        Entry(b, 17, dtype=torch.bfloat16, tensor_id=5),
        Entry(make_config("rl2", make_device("exp")), 19, tensor_id=6),
    ]
    wants = compare_group(backend, entries, totals=totals)
    assert sum(int(w.first_total()) for w in wants) > 0


@pytest.mark.parametrize("name", bad_input_names(ALGORITHM))
def test_bad_input(backend, name):
    check_bad_input(backend, config(), name)


# ----- the reference at global offsets (op-level offsets: test_cpp_step.py, test_triton_step.py) ------------
@pytest.mark.parametrize("offset", OFFSETS)
def test_offset_shards_equal_whole(offset):
    check_shards_equal_whole(config("table", d2d_std=0.2, c2c_std=0.2), offset)


@pytest.mark.parametrize("offset", OFFSETS)
def test_offset_counter_layout(offset):
    check_counter_layout(config("linear"), offset)
