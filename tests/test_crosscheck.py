"""``fastanalog bench aihwkit --crosscheck``: the aihwkit <-> fastanalog mapping, element by element (skipped without aihwkit)."""

from __future__ import annotations

import pytest
import torch

from fastanalog.reproduce.crosscheck import DEVICE_PAIRINGS, aihwkit_config, device_run, fastanalog_config

aihwkit = pytest.importorskip("aihwkit")


@pytest.fixture(scope="module")
def ak():
    from fastanalog.bench.aihwkit_cmp import load_aihwkit

    loaded = load_aihwkit()
    assert loaded is not None
    return loaded


def test_every_pairing_builds(ak):
    for p in DEVICE_PAIRINGS:
        cfg = aihwkit_config(ak, p, tau=0.6, lr=0.01, transfer_lr=0.1, in_size=4)
        assert cfg.forward.is_perfect
        assert fastanalog_config(p, tau=0.6, transfer_lr=0.1).algorithm == p.algorithm


@pytest.mark.parametrize("name", ["SoftBounds -> asgd linear", "PowStep -> asgd power 0.5"])
def test_constant_gradient_trajectories_agree(ak, name):
    """Soft bounds and power step: the same mean trajectory toward the bound (dw_min mapped with 2**gamma for PowStep)."""
    p = next(x for x in DEVICE_PAIRINGS if x.name == name)
    tr = device_run(ak, p, tau=0.6, lr=0.01, transfer_lr=0.1, steps=150, rows=64, grad=lambda w, g: torch.full_like(w, -1.0), seed=0, every=50)
    fa_w, ak_w = tr["fastanalog"], tr["aihwkit"]
    assert fa_w[-1] > 0.3  # it climbed most of the way toward tau = 0.6
    for a, b in zip(fa_w[1:], ak_w[1:]):
        assert a == pytest.approx(b, rel=0.05, abs=2e-3)
