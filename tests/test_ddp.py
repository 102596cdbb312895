"""DDP with gloo on CPU: every rank applies the same analog update (same seed and step)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastanalog as fa

STEPS = 4
GLOBAL_BATCH = 8
DW_MIN = 0.002


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    cfg = fa.AnalogConfig(algorithm="rl2", device=fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=DW_MIN, d2d_std=0.1), read_noise=0.01)
    return fa.convert_to_analog(m, cfg)


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def _train(model, rank: int, world: int):
    opt = fa.AnalogSGD(model.parameters(), lr=0.5, seed=11)
    per = GLOBAL_BATCH // world
    for k in range(STEPS):
        x, y = _batch(k)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        _train(model, rank, world)
        torch.save(model.module.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_two_gloo_ranks_stay_identical_and_match_one_rank(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # bit-identical across ranks, never broadcast

    single = _model()
    _train(single, 0, 1)
    ref = single.state_dict()
    # The 2-rank gradient is the mean of two half-batch means: equal to the 1-rank one
    # up to float summation order (~1e-7 relative). That can flip a stochastic rounding
    # whose uniform lies within rounding error of its threshold, moving an element by
    # about one pulse (dw_min times a response <= 2): so we allow a handful of elements
    # to differ, each by at most a few pulses, and everything else to match to 1e-5.
    for k in ref:
        if not ref[k].is_floating_point():
            continue
        diff = (ref[k] - r0[k]).abs()
        assert float(diff.max()) <= 4 * DW_MIN, k
        assert int((diff > 1e-5).sum()) <= max(2, ref[k].numel() // 500), k
    assert int(r0["0.analog_pulses"].sum()) > 0
