"""``fastanalog bench aihwkit``: training-step time beside IBM's aihwkit, on one linear layer.

The layer is ``Linear(1024, 1024)`` at batch 128 (``--tiny``: 64, batch 8). For each of
aihwkit's configurations nearest to a fastanalog algorithm, three training steps are
timed interleaved in this process: the plain digital layer (``nn.Linear`` +
``torch.optim.SGD``), fastanalog's, and aihwkit's. Reported: aihwkit over digital,
fastanalog over digital, and aihwkit over fastanalog, each repeat by repeat.

Pairs (aihwkit -> fastanalog):

- ``SingleRPUConfig(SoftBoundsDevice)`` -> ``asgd`` on ``LinearResponse`` (soft bounds);
- ``SingleRPUConfig(PowStepDevice)`` -> ``asgd`` on ``PowerResponse``;
- ``UnitCellRPUConfig(TransferCompound)`` (Tiki-Taka) -> ``rl`` with ``gamma=0``;
- the ``TTv2ReRamSBPreset`` and ``ChoppedTTv2ReRamSBPreset`` presets -> ``rl2``.

The hand-built aihwkit devices get the same range and ``dw_min`` as fastanalog's and
no device-to-device or cycle-to-cycle variation (fastanalog's defaults). Each pairing is
timed twice (``--reads``): with aihwkit's reads of forward, backward and transfer as it
ships them (output noise, bound management, DAC/ADC quantisation: what a user of these
configurations gets), and with those reads made ideal (``is_perfect``), as fastanalog's
are, so that the second row compares the update alone. A preset or class missing from
the installed aihwkit is skipped with a note.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

import fastanalog as fa

from .common import (
    DW_MIN,
    MS,
    RESPONSE_GAMMA,
    Panel,
    Report,
    Stats,
    linear_spec,
    measure_interleaved,
    ratio_stats,
    stats_columns,
    stats_names,
    synchronizer,
)

PULSE_NOTE = (
    "aihwkit simulates per-sample pulse trains; fastanalog writes per sample too (its default: the opposite-pulse "
    "pairs of SPEC section 2a), with AnalogConfig(update='batch') as the paper's aggregated model"
)
INSTALL_HINT = (
    "aihwkit is not installed in this Python, so there is nothing to compare against.\n"
    "Get it with `make bench-aihwkit` (installs cmake, OpenBLAS and pybind11, builds aihwkit from source into .venv "
    "in about 10 minutes, then runs `fastanalog bench aihwkit`)."
)

# Device range of both simulators (aihwkit's default w_max) and learning rate.
TAU = 0.6
LR = 0.01
# fastanalog's mixing weight for rl2 (rl is paired with Tiki-Taka, i.e. gamma = 0).
RL2_GAMMA = 0.1

# --reads: which aihwkit read settings get a row.
READS_MODES = {"both": ("shipped", "ideal"), "shipped": ("shipped",), "ideal": ("ideal",)}

COLUMNS = [
    "aihwkit_config",
    "aihwkit_reads",
    "fastanalog_config",
    "status",
    "size",
    "batch",
    *stats_names("digital_ms"),
    *stats_names("fastanalog_ms"),
    *stats_names("aihwkit_ms"),
    *stats_names("aihwkit_over_digital"),
    *stats_names("fastanalog_over_digital"),
    *stats_names("aihwkit_over_fastanalog"),
    "aihwkit_version",
    "warmup",
    "repeats",
]


class SkipConfig(Exception):
    """This aihwkit configuration cannot be built with the installed aihwkit (the message says why)."""


# ----- aihwkit ----------------------------------------------------------------------------
def load_aihwkit() -> SimpleNamespace | None:
    """aihwkit's layer, optimizer, configs and presets modules, or None when aihwkit is not importable."""
    try:
        aihwkit = importlib.import_module("aihwkit")
        nn_mod = importlib.import_module("aihwkit.nn")
        optim_mod = importlib.import_module("aihwkit.optim")
        configs = importlib.import_module("aihwkit.simulator.configs")
    except ImportError:
        return None
    try:
        presets = importlib.import_module("aihwkit.simulator.presets")
    except ImportError:
        presets = None
    return SimpleNamespace(
        version=str(getattr(aihwkit, "__version__", "unknown")),
        AnalogLinear=nn_mod.AnalogLinear,
        AnalogSGD=optim_mod.AnalogSGD,
        configs=configs,
        presets=presets,
    )


def aihwkit_has_cuda() -> bool:
    """Whether the installed aihwkit was compiled with CUDA."""
    try:
        return bool(importlib.import_module("aihwkit.simulator.rpu_base").cuda.is_compiled())
    except (ImportError, AttributeError):
        return False


def _config_class(ak: SimpleNamespace, name: str) -> Any:
    cls = getattr(ak.configs, name, None)
    if cls is None:
        raise SkipConfig(f"aihwkit {ak.version} has no aihwkit.simulator.configs.{name}")
    return cls


def _preset(ak: SimpleNamespace, name: str) -> Any:
    cls = getattr(ak.presets, name, None) if ak.presets is not None else None
    if cls is None:
        raise SkipConfig(f"aihwkit {ak.version} has no aihwkit.simulator.presets.{name}")
    return cls()


# Variation parameters of aihwkit's pulsed devices, set to 0 to match fastanalog's variation-free default devices.
_VARIATION_FIELDS = ("dw_min_dtod", "dw_min_std", "w_max_dtod", "w_min_dtod", "up_down_dtod", "pow_gamma_dtod", "pow_up_down_dtod")


def _device(ak: SimpleNamespace, name: str, **extra: Any) -> Any:
    """An aihwkit pulsed device on ``[-TAU, TAU]`` with fastanalog's ``dw_min`` and no variation."""
    dev = _config_class(ak, name)(w_max=TAU, w_min=-TAU, dw_min=DW_MIN, **extra)
    for field_name in _VARIATION_FIELDS:
        if hasattr(dev, field_name):
            setattr(dev, field_name, 0.0)
    return dev


def _ideal_reads(rpu_config: Any) -> Any:
    """Make forward, backward and transfer reads ideal (``is_perfect``) where the config has them."""
    for holder, name in ((rpu_config, "forward"), (rpu_config, "backward"), (getattr(rpu_config, "device", None), "transfer_forward")):
        io = getattr(holder, name, None) if holder is not None else None
        if io is not None and hasattr(io, "is_perfect"):
            io.is_perfect = True
    return rpu_config


def _soft_bounds(ak: SimpleNamespace) -> Any:
    return _config_class(ak, "SingleRPUConfig")(device=_device(ak, "SoftBoundsDevice"))


def _pow_step(ak: SimpleNamespace) -> Any:
    return _config_class(ak, "SingleRPUConfig")(device=_device(ak, "PowStepDevice", pow_gamma=RESPONSE_GAMMA))


def _tiki_taka(ak: SimpleNamespace) -> Any:
    compound = _config_class(ak, "TransferCompound")(
        unit_cell_devices=[_device(ak, "SoftBoundsDevice"), _device(ak, "SoftBoundsDevice")],
        transfer_every=1,
        units_in_mbatch=True,
        gamma=0.0,
    )
    return _config_class(ak, "UnitCellRPUConfig")(device=compound)


@dataclass(frozen=True)
class Pairing:
    """One aihwkit configuration and the fastanalog configuration nearest to it."""

    aihwkit_label: str
    short: str
    build: Callable[[SimpleNamespace], Any]
    algorithm: str
    response: str  # "linear" or "power"
    mix_gamma: float

    @property
    def fastanalog_label(self) -> str:
        shape = f"PowerResponse(gamma={RESPONSE_GAMMA:g})" if self.response == "power" else "LinearResponse"
        mix = f", gamma={self.mix_gamma:g}" if self.algorithm in ("rl", "rl2") else ""
        return f"{self.algorithm} {shape}{mix}"

    def fastanalog_config(self) -> fa.AnalogConfig:
        if self.response == "power":
            device = fa.PowerResponse(tau=TAU, gamma=RESPONSE_GAMMA, dw_min=DW_MIN)
        else:
            device = fa.LinearResponse(tau=TAU, dw_min=DW_MIN)
        return fa.AnalogConfig(algorithm=self.algorithm, device=device, gamma=self.mix_gamma)


PAIRINGS: tuple[Pairing, ...] = (
    Pairing("SingleRPUConfig(SoftBoundsDevice)", "SoftBounds", _soft_bounds, "asgd", "linear", 0.0),
    Pairing("SingleRPUConfig(PowStepDevice)", "PowStep", _pow_step, "asgd", "power", 0.0),
    Pairing("UnitCellRPUConfig(TransferCompound), Tiki-Taka", "Tiki-Taka", _tiki_taka, "rl", "linear", 0.0),
    Pairing("TTv2ReRamSBPreset", "TTv2", lambda ak: _preset(ak, "TTv2ReRamSBPreset"), "rl2", "linear", RL2_GAMMA),
    Pairing("ChoppedTTv2ReRamSBPreset (c-TTv2)", "c-TTv2", lambda ak: _preset(ak, "ChoppedTTv2ReRamSBPreset"), "rl2", "linear", RL2_GAMMA),
)


def select_pairings(algorithms: Sequence[str]) -> list[Pairing]:
    """The pairings whose fastanalog algorithm is in ``algorithms``; a clear error when there is none."""
    pairings = [p for p in PAIRINGS if p.algorithm in algorithms]
    if not pairings:
        paired = sorted({p.algorithm for p in PAIRINGS})
        raise ValueError(f"--algorithms {','.join(algorithms)} pairs with no aihwkit configuration: include one of {', '.join(paired)}")
    return pairings


# ----- the benchmark ---------------------------------------------------------------------
def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _aihwkit_model(
    ak: SimpleNamespace, pairing: Pairing, reads: str, n: int, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    rpu_config = pairing.build(ak)
    if reads == "ideal":
        rpu_config = _ideal_reads(rpu_config)
    model = ak.AnalogLinear(n, n, bias=True, rpu_config=rpu_config)
    if device.type == "cuda":
        model = model.cuda()
    opt = ak.AnalogSGD(model.parameters(), lr=LR)
    if hasattr(opt, "regroup_param_groups"):
        opt.regroup_param_groups(model)
    return model, opt


def _row(
    pairing: Pairing, reads: str, n: int, batch: int, version: str, warmup: int, repeats: int, status: str, times: dict[str, list[float]] | None
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "aihwkit_config": pairing.aihwkit_label,
        "aihwkit_reads": reads,
        "fastanalog_config": pairing.fastanalog_label,
        "status": status,
        "size": n,
        "batch": batch,
        "aihwkit_version": version,
        "warmup": warmup,
        "repeats": repeats,
    }
    for name in ("digital", "fastanalog", "aihwkit"):
        row.update(stats_columns(f"{name}_ms", Stats.of(times[name]).scaled(MS) if times else None))
    row.update(stats_columns("aihwkit_over_digital", ratio_stats(times["aihwkit"], times["digital"]) if times else None))
    row.update(stats_columns("fastanalog_over_digital", ratio_stats(times["fastanalog"], times["digital"]) if times else None))
    row.update(stats_columns("aihwkit_over_fastanalog", ratio_stats(times["aihwkit"], times["fastanalog"]) if times else None))
    return row


def _stats(row: dict[str, Any], prefix: str) -> Stats | None:
    if row.get(f"{prefix}_median", "") == "":
        return None
    return Stats(row[f"{prefix}_median"], row[f"{prefix}_min"], row[f"{prefix}_max"], row["repeats"])


def _fmt(row: dict[str, Any], prefix: str) -> str:
    s = _stats(row, prefix)
    return s.fmt() if s is not None else "-"


def run_aihwkit(
    ak: SimpleNamespace,
    *,
    algorithms: Sequence[str],
    device: torch.device,
    warmup: int,
    repeats: int,
    tiny: bool,
    reads: Sequence[str] = READS_MODES["both"],
) -> Report:
    """Time every pairing whose fastanalog algorithm is in ``algorithms``, once per aihwkit read setting in ``reads``."""
    unknown = [r for r in reads if r not in READS_MODES["both"]]
    if unknown or not reads:
        raise ValueError(f"reads must be a non-empty subset of {READS_MODES['both']}, got {tuple(reads)}")
    pairings = [(p, r) for p in select_pairings(algorithms) for r in reads]
    spec = linear_spec(64, 8) if tiny else linear_spec(1024, 128)
    n, batch = spec.input_shape[0], spec.batch
    sync = synchronizer(device)
    x, y = spec.data(device)
    torch.manual_seed(0)
    digital = spec.build().to(device)
    digital_step = _train_step(digital, torch.optim.SGD(digital.parameters(), lr=LR), x, y)

    print(f"aihwkit {ak.version}: Linear({n}, {n}) at batch {batch}. {PULSE_NOTE}.", flush=True)
    rows = []
    for pairing, mode in pairings:
        label = f"{pairing.aihwkit_label}, {mode} reads"
        try:
            ak_model, ak_opt = _aihwkit_model(ak, pairing, mode, n, device)
        except SkipConfig as e:
            print(f"  skipped {label}: {e}", flush=True)
            rows.append(_row(pairing, mode, n, batch, ak.version, warmup, repeats, f"skipped: {e}", None))
            continue
        except Exception as e:  # an aihwkit that rejects this configuration: report it and go on with the others
            reason = f"aihwkit could not build it: {type(e).__name__}: {e}"
            print(f"  skipped {label}: {reason}", flush=True)
            rows.append(_row(pairing, mode, n, batch, ak.version, warmup, repeats, f"skipped: {reason}", None))
            continue
        fa_model = fa.convert_to_analog(copy.deepcopy(digital), pairing.fastanalog_config())
        fa_step = _train_step(fa_model, fa.AnalogSGD(fa_model.parameters(), lr=LR, seed=0), x, y)
        ak_step = _train_step(ak_model, ak_opt, x, y)
        times = measure_interleaved({"digital": digital_step, "fastanalog": fa_step, "aihwkit": ak_step}, warmup=warmup, repeats=repeats, sync=sync)
        row = _row(pairing, mode, n, batch, ak.version, warmup, repeats, "ok", times)
        rows.append(row)
        print(
            f"  {label} vs fastanalog {pairing.fastanalog_label}: "
            f"aihwkit/digital {row['aihwkit_over_digital_median']:.3g}, aihwkit/fastanalog {row['aihwkit_over_fastanalog_median']:.3g}",
            flush=True,
        )
        del ak_model, ak_opt, fa_model

    groups = [f"{p.short} {mode}" if r["status"] == "ok" else f"{p.short} {mode} (skipped)" for (p, mode), r in zip(pairings, rows)]
    panels = [
        Panel(
            "training step time over the digital step (nn.Linear + SGD)",
            "time ratio (median, min-max)",
            groups,
            {
                "aihwkit / digital": [_stats(r, "aihwkit_over_digital") for r in rows],
                "fastanalog / digital": [_stats(r, "fastanalog_over_digital") for r in rows],
            },
        ),
        Panel("aihwkit time / fastanalog time, nearest pairs", "time ratio", groups, {"aihwkit / fastanalog": [_stats(r, "aihwkit_over_fastanalog") for r in rows]}),
    ]
    notes = [
        f"{PULSE_NOTE}.",
        f"Layer Linear({n}, {n}), batch {batch}; one training step = zero_grad, forward, cross-entropy, backward, step; "
        f"the three steps are timed interleaved, ratios repeat by repeat, median [min, max] over {repeats} repeats "
        f"after {warmup} warm-up steps.",
        f"Devices on [-{TAU:g}, {TAU:g}], dw_min {DW_MIN:g}, no variation. aihwkit reads (forward, backward, transfer): "
        "'shipped' as aihwkit configures them (noise, bound management, quantisation), 'ideal' made perfect (is_perfect), "
        "as fastanalog's reads are.",
    ]
    table_spec = [
        ("aihwkit config", lambda r: r["aihwkit_config"]),
        ("aihwkit reads", lambda r: r["aihwkit_reads"]),
        ("fastanalog config", lambda r: r["fastanalog_config"]),
        ("aihwkit / digital", lambda r: _fmt(r, "aihwkit_over_digital")),
        ("fastanalog / digital", lambda r: _fmt(r, "fastanalog_over_digital")),
        ("aihwkit / fastanalog", lambda r: _fmt(r, "aihwkit_over_fastanalog")),
        ("status", lambda r: r["status"]),
    ]
    return Report("aihwkit", f"Training step beside aihwkit {ak.version}", COLUMNS, rows, table_spec, panels, notes)
