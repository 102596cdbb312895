"""Every GPU backend against the reference on CUDA tensors (run by `make gpu-check`; skipped without a GPU).

The reference runs on the same CUDA tensors, so both sides see the same inputs; the
pulse counts of the gradient-driven write must be equal element for element (they
depend on Philox words and float32 divisions only). The transfer's counts depend on
the new P, whose last bit can differ where a backend's pow/exp differs from torch's
by an ulp, so at most one element in 10^4 may differ there; arrays agree within a
few float32 ulps of their range.
"""

from __future__ import annotations

import pytest
import torch

import fastanalog as fa
from fastanalog.ops import dispatch, philox, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

GPU_BACKENDS = ("triton", "cuda")


def _device(family: str, noise: bool) -> fa.ResponseDevice:
    opts = dict(c2c_std=0.2, d2d_std=0.1) if noise else {}
    if family == "linear":
        return fa.LinearResponse(tau=0.8, dw_min=0.002, **opts)
    if family == "power":
        return fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.002, asymmetry=0.1, **opts)
    if family == "exp":
        return fa.ExpResponse(tau=0.6, gamma=1.5, dw_min=0.002, **opts)
    grid = [i / 16 for i in range(17)]
    return fa.TableResponse(tau=0.6, dw_min=0.002, up=tuple(1 - x for x in grid), down=tuple(grid), **opts)


def _arrays(alg: str, n: int, dtype: torch.dtype, seed: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = {"main": (0.2 * torch.randn(n, generator=gen, device="cuda")).to(dtype)}
    if alg != "asgd":
        out["residual"] = (0.05 * torch.randn(n, generator=gen, device="cuda")).to(dtype)
    out["buffer"] = (0.001 * torch.randn(n, generator=gen, device="cuda")).to(dtype) if alg == "rl2" else None
    return out


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("alg", ["asgd", "rl", "rl2"])
@pytest.mark.parametrize("family", ["linear", "power", "exp", "table"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("excess", [False, True])
@pytest.mark.parametrize("noise", [False, True])
def test_backend_equals_reference_on_cuda(backend, alg, family, dtype, excess, noise):
    if not dispatch.backend_available(backend):
        pytest.skip(f"the {backend} backend is not available here")
    n = 70001
    cfg = fa.AnalogConfig(algorithm=alg, device=_device(family, noise), read_noise=0.01 if noise else 0.0, transfer_lr=0.3)
    gen = torch.Generator(device="cuda").manual_seed(7)
    g = (0.5 * torch.randn(n, generator=gen, device="cuda")).to(dtype)
    A = (g.float().abs() + torch.rand(n, generator=gen, device="cuda") * 0.3).to(dtype) if excess else None
    key = philox.step_key(11, 3, 2)
    ref_arrays = _arrays(alg, n, dtype, 1)
    got_arrays = _arrays(alg, n, dtype, 1)
    item = dict(grad=g, config=cfg, key=key, tensor_id=2, A=A)
    with dispatch.use_backend("reference"):
        ref = dispatch.analog_step_group([dispatch.StepItem(ref_arrays, None, **item)], lr=0.1, step=1)[0]
    with dispatch.use_backend(backend):
        got = dispatch.analog_step_group([dispatch.StepItem(got_arrays, None, **item)], lr=0.1, step=1)[0]
    assert torch.equal(got.first.cpu(), ref.first.cpu())
    if excess:
        assert torch.equal(got.first_pairs.cpu(), ref.first_pairs.cpu())
    if ref.main is not None:
        assert int((got.main != ref.main).sum()) <= n // 10_000
    for name, a in ref_arrays.items():
        if a is not None:
            torch.testing.assert_close(got_arrays[name].float(), a.float(), rtol=0, atol=4 * torch.finfo(dtype).eps)
    with dispatch.use_backend(backend):
        totals = dispatch.analog_step_group([dispatch.StepItem(_arrays(alg, n, dtype, 1), None, **item)], lr=0.1, step=1, totals=True)[0]
    assert int(totals.first_total()) == int(reference.pulse_total(ref.first, ref.first_pairs))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensors_on_another_device_than_the_current_one(backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    if not dispatch.backend_available(backend):
        pytest.skip(f"the {backend} backend is not available here")
    cfg = fa.AnalogConfig(algorithm="asgd")
    with torch.cuda.device(0), dispatch.use_backend(backend):
        W = torch.zeros(1000, device="cuda:1")
        g = torch.randn(1000, device="cuda:1")
        out = dispatch.analog_step_group([dispatch.StepItem({"main": W}, None, g, cfg, 5, 0)], lr=1.0, step=1)[0]
    Wr = torch.zeros(1000, device="cuda:1")
    ref = reference.asgd_step_ref(Wr, g, lr=1.0, config=cfg, key=5, tensor_id=0)
    assert torch.equal(out.first.cpu(), ref.first.cpu())
