"""Cross-check against IBM's aihwkit: the same devices and algorithms, element by element and on a small MLP.

Run by ``fastanalog bench aihwkit --crosscheck`` (``make crosscheck``). Two parts:

1. Device level: independent elements (one aihwkit tile, one fastanalog layer, one row per
   replica) under a constant gradient (trajectories toward the bound) and under a noisy
   gradient around ``w_star`` (fixed points), for each pairing below. The gradient is set by
   hand and written as one sample per element (a one-hot input per column), so neither
   simulator sees opposite pulses of different samples cancel.
2. The digits table: MLP 64-64-10 on scikit-learn's digits, batch 16, 30 epochs, lr 0.1,
   soft-bounds (linear) devices with tau 1 and dw_min 0.001, the same initial weights and
   data order in both; test accuracy per configuration and seed.

Parameter mapping (aihwkit -> fastanalog), as built by :func:`aihwkit_config`:

- ``SoftBoundsDevice(w_min=-tau, w_max=tau, dw_min)`` -> ``LinearResponse(tau, dw_min)``:
  both step ``dw_min * (1 - w / tau)`` up and ``dw_min * (1 + w / tau)`` down.
- ``PowStepDevice(pow_gamma=g, dw_min=d * 2**g)`` -> ``PowerResponse(tau, gamma=g, dw_min=d)``:
  aihwkit's step is ``dw_min * ((w_max - w) / (w_max - w_min))**g``, fastanalog's
  ``dw_min * ((tau - w) / tau)**g``, a factor ``2**g`` apart at equal ``dw_min``.
- ``dw_min_std`` (aihwkit's cycle-to-cycle noise, 0.3 by default) -> ``c2c_std`` (0 here);
  every ``*_dtod`` (device-to-device) -> ``d2d_std`` (0 here).
- ``TransferCompound(gamma=g, transfer_every=1, units_in_mbatch=True, n_reads_per_transfer=in_size,
  transfer_lr=t, scale_transfer_lr=True)`` -> ``rl`` with ``gamma=g`` and
  ``transfer_lr = t * lr`` (aihwkit scales its transfer rate by the SGD learning rate);
  aihwkit reads one column per transfer unless ``n_reads_per_transfer`` covers them all.
  ``gamma=0`` is Tiki-Taka.
- ``BufferedTransferCompound(..., momentum=0, forget_buffer=False, thres_scale=1)`` -> ``rl2``
  (buffer "accumulate", threshold 1) with ``transfer_lr = t * lr * gamma``: aihwkit multiplies
  the buffered transfer rate by ``gamma_vec[from] / gamma_vec[to] = gamma`` when both are > 0.
  aihwkit's defaults (``momentum=0.1``, ``forget_buffer=True``) keep a tenth of the buffer after a
  transfer instead of its sub-granularity remainder; its transfer update defaults to
  ``desired_bl=1`` (at most one pulse per transfer), raised here to 31 so that a transfer can
  write what fastanalog's does.
- Reads (forward, backward, transfer) are made ideal (``is_perfect=True``), as fastanalog's
  are; read noise would map to ``read_noise``.

aihwkit's pulse random numbers do not follow ``torch.manual_seed``: its C++ simulator seeds
its own generator, so two aihwkit runs with the same seed differ, and seeds here fix only
the initial weights and the data order.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fastanalog as fa

from .common import analog_config, update_mode_name
from .training import mean_std

DW_MIN = 0.001


@dataclass(frozen=True)
class Pairing:
    """One aihwkit configuration and its fastanalog twin."""

    name: str
    algorithm: str  # fastanalog algorithm
    family: str  # linear | power
    gamma: float = 0.0  # mixing weight (rl, rl2)
    pow_gamma: float = 0.5

    def label(self) -> str:
        return self.name


DEVICE_PAIRINGS = (
    Pairing("SoftBounds -> asgd linear", "asgd", "linear"),
    Pairing("PowStep -> asgd power 0.5", "asgd", "power"),
    Pairing("TransferCompound gamma 0 -> rl gamma 0 (Tiki-Taka)", "rl", "linear", 0.0),
    Pairing("TransferCompound gamma 0.1 -> rl gamma 0.1", "rl", "linear", 0.1),
    Pairing("BufferedTransferCompound gamma 0.1 -> rl2 gamma 0.1", "rl2", "linear", 0.1),
)
MLP_PAIRINGS = (
    Pairing("SoftBounds -> asgd", "asgd", "linear"),
    Pairing("TransferCompound gamma 0 -> rl gamma 0", "rl", "linear", 0.0),
    Pairing("TransferCompound gamma 0.1 -> rl gamma 0.1", "rl", "linear", 0.1),
    Pairing("BufferedTransferCompound gamma 0.1 -> rl2 gamma 0.1", "rl2", "linear", 0.1),
)


# ----- configs -------------------------------------------------------------------------------------
def _zero_variation(dev: Any) -> Any:
    for name in ("dw_min_dtod", "dw_min_std", "w_max_dtod", "w_min_dtod", "up_down_dtod", "pow_gamma_dtod", "pow_up_down_dtod", "write_noise_std"):
        if hasattr(dev, name):
            setattr(dev, name, 0.0)
    if hasattr(dev, "up_down"):
        dev.up_down = 0.0
    return dev


def _ak_device(ak: SimpleNamespace, p: Pairing, tau: float) -> Any:
    c = ak.configs
    if p.family == "power":
        dev = c.PowStepDevice(w_min=-tau, w_max=tau, dw_min=DW_MIN * 2**p.pow_gamma, pow_gamma=p.pow_gamma)
    else:
        dev = c.SoftBoundsDevice(w_min=-tau, w_max=tau, dw_min=DW_MIN)
    return _zero_variation(dev)


def aihwkit_config(ak: SimpleNamespace, p: Pairing, *, tau: float, lr: float, transfer_lr: float, in_size: int) -> Any:
    """The aihwkit RPU config of pairing ``p`` (ideal reads), for fastanalog's ``transfer_lr`` at SGD learning rate ``lr``."""
    c = ak.configs
    if p.algorithm == "asgd":
        cfg = c.SingleRPUConfig(device=_ak_device(ak, p, tau))
    else:
        common = dict(
            unit_cell_devices=[_ak_device(ak, p, tau), _ak_device(ak, p, tau)],
            gamma=p.gamma,
            transfer_every=1,
            units_in_mbatch=True,
            n_reads_per_transfer=in_size,
            scale_transfer_lr=True,
        )
        if p.algorithm == "rl":
            compound = c.TransferCompound(transfer_lr=transfer_lr / lr, **common)
        else:
            scale = lr * (p.gamma if p.gamma > 0 else 1.0)
            compound = c.BufferedTransferCompound(
                transfer_lr=transfer_lr / scale, momentum=0.0, forget_buffer=False, thres_scale=1.0, **common
            )
            compound.transfer_update = c.UpdateParameters(desired_bl=31)
        compound.transfer_forward.is_perfect = True
        cfg = c.UnitCellRPUConfig(device=compound)
    cfg.forward.is_perfect = True
    cfg.backward.is_perfect = True
    return cfg


def fastanalog_config(p: Pairing, *, tau: float, transfer_lr: float, update: str | None = None) -> fa.AnalogConfig:
    dev = fa.PowerResponse(tau=tau, gamma=p.pow_gamma, dw_min=DW_MIN) if p.family == "power" else fa.LinearResponse(tau=tau, dw_min=DW_MIN)
    kwargs: dict[str, Any] = {}
    if p.algorithm in ("rl", "rl2"):
        kwargs = dict(gamma=p.gamma, transfer_lr=transfer_lr)
    return analog_config(p.algorithm, dev, update=update, **kwargs)


# ----- device level --------------------------------------------------------------------------------
def _ak_tile(ak: SimpleNamespace, rpu_config: Any, rows: int, w0: float, lr: float) -> Any:
    from aihwkit.simulator.tiles import AnalogTile

    tile = AnalogTile(rows, 1, rpu_config)
    tile.set_weights(torch.full((rows, 1), float(w0)))
    tile.set_learning_rate(lr)
    return tile


def _ak_weight(tile: Any) -> torch.Tensor:
    w = tile.get_weights()
    w = w[0] if isinstance(w, tuple) else w
    return w.reshape(-1).float()


def device_run(
    ak: SimpleNamespace, p: Pairing, *, tau: float, lr: float, transfer_lr: float, steps: int, rows: int, grad: Callable[[torch.Tensor, torch.Generator], torch.Tensor], seed: int, every: int
) -> dict[str, list[float]]:
    """Both simulators on ``rows`` elements for ``steps`` steps of the hand-set gradient ``grad(w, gen)``; replica means every ``every`` steps."""
    out: dict[str, list[float]] = {}
    # fastanalog: a (rows, 1) layer, gradient by hand.
    layer = fa.AnalogLinear(1, rows, bias=False, config=fastanalog_config(p, tau=tau, transfer_lr=transfer_lr))
    layer.set_digital_weight(torch.zeros(rows, 1))
    opt = fa.AnalogSGD(layer.parameters(), lr=lr, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    trace = []
    for k in range(steps + 1):
        w = layer.forward_weight().reshape(-1)
        if k % every == 0:
            trace.append(float(w.mean()))
        if k == steps:
            break
        layer.weight.grad = grad(w, gen).reshape(rows, 1)
        opt.step()
    out["fastanalog"] = trace
    # aihwkit: a (rows, 1) tile, one one-hot sample per step: W -= lr * d x^T.
    tile = _ak_tile(ak, aihwkit_config(ak, p, tau=tau, lr=lr, transfer_lr=transfer_lr, in_size=1), rows, 0.0, lr)
    gen = torch.Generator().manual_seed(seed)
    x = torch.ones(1, 1)
    trace = []
    for k in range(steps + 1):
        w = _ak_weight(tile)
        if k % every == 0:
            trace.append(float(w.mean()))
        if k == steps:
            break
        tile.update(x, grad(w, gen).reshape(1, rows))
    out["aihwkit"] = trace
    return out


def device_level(ak: SimpleNamespace, *, quick: bool, say: Callable[[str], None]) -> tuple[list[dict], dict]:
    """Constant-gradient trajectories and noisy fixed points for every device pairing."""
    rows_out: list[dict] = []
    traces: dict[str, Any] = {}
    tau, lr, transfer_lr = 0.6, 0.01, 0.1
    rows = 64 if quick else 256
    steps_c = 200 if quick else 600
    steps_n = 600 if quick else 3000
    w_star, sigma = 0.3, 0.5
    for p in DEVICE_PAIRINGS:
        t = time.perf_counter()
        const = device_run(ak, p, tau=tau, lr=lr, transfer_lr=transfer_lr, steps=steps_c, rows=rows, grad=lambda w, g: torch.full_like(w, -1.0), seed=0, every=10)
        noisy = device_run(
            ak, p, tau=tau, lr=lr, transfer_lr=transfer_lr, steps=steps_n, rows=rows,
            grad=lambda w, g: (w - w_star) + sigma * torch.randn(w.shape, generator=g), seed=0, every=10,
        )  # fmt: skip
        traces[p.name] = {"constant": const, "noisy": noisy}
        half = len(noisy["fastanalog"]) // 2
        fp = {k: sum(v[half:]) / len(v[half:]) for k, v in noisy.items()}
        end = {k: v[-1] for k, v in const.items()}
        mid = {k: v[len(v) // 4] for k, v in const.items()}
        rows_out.append(
            {
                "pairing": p.name,
                "constant_w_at_quarter_aihwkit": round(mid["aihwkit"], 4),
                "constant_w_at_quarter_fastanalog": round(mid["fastanalog"], 4),
                "constant_w_end_aihwkit": round(end["aihwkit"], 4),
                "constant_w_end_fastanalog": round(end["fastanalog"], 4),
                "fixed_point_aihwkit": round(fp["aihwkit"], 4),
                "fixed_point_fastanalog": round(fp["fastanalog"], 4),
                "fixed_point_diff": round(fp["fastanalog"] - fp["aihwkit"], 4),
            }
        )
        say(f"  device level {p.name}: fixed point aihwkit {fp['aihwkit']:.4f}, fastanalog {fp['fastanalog']:.4f} ({time.perf_counter() - t:.0f} s)")
    setup = dict(tau=tau, lr=lr, transfer_lr=transfer_lr, rows=rows, steps_constant=steps_c, steps_noisy=steps_n, w_star=w_star, sigma=sigma)
    return rows_out, {"traces": traces, "setup": setup}


# ----- digits MLP ------------------------------------------------------------------------------------
def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _train(model: nn.Module, opt: torch.optim.Optimizer, data: tuple, *, epochs: int, batch: int, seed: int) -> float:
    (x, y), (xt, yt) = data
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    model.train()
    return 100 * acc


def mlp_table(ak: SimpleNamespace, *, seeds: int, epochs: int, say: Callable[[str], None]) -> list[dict]:
    """Test accuracy of the digits MLP per pairing and seed, aihwkit | fastanalog (and digital)."""
    from aihwkit.nn.conversion import convert_to_analog as ak_convert

    from ..train.data import load_digits

    data = (load_digits(train=True), load_digits(train=False))
    data = ((data[0][0].flatten(1), data[0][1]), (data[1][0].flatten(1), data[1][1]))
    lr, batch, tau, transfer_lr = 0.1, 16, 1.0, 0.1
    rows = []
    for seed in range(seeds):
        base = _mlp(seed)
        d = copy.deepcopy(base)
        acc_d = _train(d, torch.optim.SGD(d.parameters(), lr=lr), data, epochs=epochs, batch=batch, seed=seed)
        rows.append({"pairing": "digital (torch SGD)", "seed": seed, "aihwkit": "", "fastanalog": round(acc_d, 2), "aihwkit_s": "", "fastanalog_s": ""})
        for p in MLP_PAIRINGS:
            t = time.perf_counter()
            fm = fa.convert_to_analog(copy.deepcopy(base), fastanalog_config(p, tau=tau, transfer_lr=transfer_lr))
            acc_f = _train(fm, fa.AnalogSGD(fm.parameters(), lr=lr, seed=seed), data, epochs=epochs, batch=batch, seed=seed)
            tf = time.perf_counter() - t
            t = time.perf_counter()
            am = ak_convert(copy.deepcopy(base), aihwkit_config(ak, p, tau=tau, lr=lr, transfer_lr=transfer_lr, in_size=64))
            aopt = ak.AnalogSGD(am.parameters(), lr=lr)
            if hasattr(aopt, "regroup_param_groups"):
                aopt.regroup_param_groups(am)
            acc_a = _train(am, aopt, data, epochs=epochs, batch=batch, seed=seed)
            ta = time.perf_counter() - t
            rows.append({"pairing": p.name, "seed": seed, "aihwkit": round(acc_a, 2), "fastanalog": round(acc_f, 2), "aihwkit_s": round(ta, 1), "fastanalog_s": round(tf, 1)})
            say(f"  digits MLP {p.name}, seed {seed}: aihwkit {acc_a:.2f}%, fastanalog {acc_f:.2f}%")
    return rows


def mlp_summary(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["pairing"] for r in rows):
        mine = [r for r in rows if r["pairing"] == name]
        fm, fs = mean_std([r["fastanalog"] for r in mine])
        am, asd = mean_std([r["aihwkit"] for r in mine if r["aihwkit"] != ""])
        out.append(
            {
                "pairing": name,
                "seeds": len(mine),
                "aihwkit_mean": "" if math.isnan(am) else round(am, 2),
                "aihwkit_std": "" if math.isnan(asd) else round(asd, 2),
                "fastanalog_mean": round(fm, 2),
                "fastanalog_std": round(fs, 2),
                "diff": "" if math.isnan(am) else round(fm - am, 2),
            }
        )
    return out


def reason(name: str, diff: float | str, std: float) -> str:
    """Why the two simulators can differ on this row (and whether the difference is within the seed spread)."""
    if diff == "":
        return "reference"
    within = abs(float(diff)) <= max(2 * std, 1.0)
    why = []
    why.append(f"per-sample pulse trains in aihwkit, fastanalog {update_mode_name()} mode")
    if "Buffered" in name:
        why.append("aihwkit caps a transfer at desired_bl pulses")
    if "Transfer" in name:
        why.append("aihwkit's transfer writes a stochastic pulse train, fastanalog stochastic rounding")
    return ("agree within the seed spread" if within else "differ") + "; " + "; ".join(why)


def write_crosscheck(out: Path, device_rows: list[dict], device_extra: dict, mlp_rows: list[dict], speed_md: str | None, ak_version: str, minutes: float) -> Path:
    from .report import _plt, cpu_name, md_table, write_csv

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "crosscheck_device.csv", device_rows)
    write_csv(out / "crosscheck_mlp_runs.csv", mlp_rows)
    summary = mlp_summary(mlp_rows)
    write_csv(out / "crosscheck_mlp.csv", summary)
    plt = _plt()
    traces = device_extra["traces"]
    fig, axes = plt.subplots(2, len(traces), figsize=(3.2 * len(traces), 6), squeeze=False)
    for j, (name, tr) in enumerate(traces.items()):
        for i, kind in enumerate(("constant", "noisy")):
            ax = axes[i][j]
            for k, (sim, ys) in enumerate(tr[kind].items()):
                ax.plot([10 * t for t in range(len(ys))], ys, color=f"C{k}", label=sim, lw=1)
            ax.set_title(f"{name.split('->')[0].strip()}\n{kind} gradient", fontsize=7)
            ax.tick_params(labelsize=6)
            if j == 0:
                ax.set_ylabel("mean weight", fontsize=7)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "crosscheck_device.png", dpi=110)
    plt.close(fig)
    s = device_extra["setup"]
    md = [
        f"# fastanalog against aihwkit {ak_version}",
        "",
        f"Took {minutes:.1f} min on {cpu_name()}. fastanalog {fa.__version__} ({update_mode_name()} update), torch {torch.__version__}. "
        "Parameter mapping: docs/REPRODUCE.md (SoftBounds <-> linear, PowStep <-> power with dw_min x 2^gamma, TransferCompound "
        "<-> rl, BufferedTransferCompound <-> rl2 with aihwkit's transfer rate multiplied by gamma). aihwkit's pulse generator "
        "ignores torch's seed: its runs are not repeatable, so compare means and spreads.",
        "",
        "## Device level",
        "",
        f"{s['rows']} independent elements, tau {s['tau']}, dw_min {DW_MIN}, lr {s['lr']}, transfer_lr {s['transfer_lr']} (fastanalog units). "
        f"Constant gradient -1 for {s['steps_constant']} steps from 0 (the weight climbs toward tau); noisy gradient "
        f"(w - {s['w_star']}) + {s['sigma']} z for {s['steps_noisy']} steps, fixed point = mean over the second half.",
        "",
        md_table(
            ["pairing", "constant: w at 1/4 (aihwkit / fastanalog)", "constant: w at end", "fixed point aihwkit", "fixed point fastanalog", "difference"],
            [
                [
                    r["pairing"],
                    f"{r['constant_w_at_quarter_aihwkit']} / {r['constant_w_at_quarter_fastanalog']}",
                    f"{r['constant_w_end_aihwkit']} / {r['constant_w_end_fastanalog']}",
                    r["fixed_point_aihwkit"],
                    r["fixed_point_fastanalog"],
                    f"{r['fixed_point_diff']:+.4f}",
                ]
                for r in device_rows
            ],
        ),
        "",
        "Each element gets one sample per step, so per-sample and batch pulses are the same here; what remains is aihwkit's "
        "stochastic pulse trains (a binomial count, each pulse at the weight it finds) against fastanalog's stochastic rounding "
        "(responses at the step's starting weight): equal means, different spreads. ![device](crosscheck_device.png)",
        "",
        "## Digits MLP 64-64-10",
        "",
        "Batch 16, 30 epochs, lr 0.1, soft-bounds (linear) devices tau 1, dw_min 0.001, rl/rl2 transfer_lr 0.1 (fastanalog units), "
        "the same initial weights and data order in both; test accuracy (%) on the 359 test digits.",
        "",
        md_table(
            ["pairing", "seeds", "aihwkit", "fastanalog", "fastanalog - aihwkit", "why"],
            [
                [
                    r["pairing"],
                    r["seeds"],
                    "-" if r["aihwkit_mean"] == "" else f"{r['aihwkit_mean']} +- {r['aihwkit_std']}",
                    f"{r['fastanalog_mean']} +- {r['fastanalog_std']}",
                    "-" if r["diff"] == "" else f"{r['diff']:+.2f}",
                    reason(r["pairing"], r["diff"], max(float(r["aihwkit_std"] or 0), float(r["fastanalog_std"]))),
                ]
                for r in summary
            ],
        ),
        "",
        md_table(["pairing", "seed", "aihwkit", "fastanalog", "aihwkit s", "fastanalog s"], [[r[k] for k in ("pairing", "seed", "aihwkit", "fastanalog", "aihwkit_s", "fastanalog_s")] for r in mlp_rows]),
        "",
    ]
    if speed_md:
        md += ["## Speed, one thread", "", speed_md, ""]
    path = out / "CROSSCHECK.md"
    path.write_text("\n".join(md))
    return path
