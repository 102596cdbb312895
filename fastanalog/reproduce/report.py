"""Write ``REPORT.md``, one CSV per table, the PNG figures and ``summary.json`` from :func:`.experiments.run_all`'s results."""

from __future__ import annotations

import csv
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import fastanalog as fa

from .common import BATCH_MODE_UNAVAILABLE, HAS_UPDATE_MODE, update_mode_name
from .experiments import DEFAULTS_LR, OFF_CENTRE, REFERENCE, RL_TRANSFER_LR, THEORY_DEVICE, THEORY_PROBLEM, Settings

NOT_QUOTED = "paper value: not quoted"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----- findings -----------------------------------------------------------------------------------
def findings(res: dict[str, Any]) -> dict[str, Any]:
    """Numbers and directions the report states (also written to summary.json)."""
    f: dict[str, Any] = {}
    th = res.get("theory")
    if th:
        fp = th["fixed_point"]
        f["fixed_point_max_abs_error"] = max(abs(r["measured"] - r["predicted"]) for r in fp)
        gaps = {}
        for r in fp:
            gaps.setdefault(r["tau"], []).append((r["sigma"], abs(r["gap_measured"])))
        f["gap_grows_with_sigma"] = all(all(b[1] >= a[1] - 2e-3 for a, b in zip(v, v[1:])) for v in (sorted(x) for x in gaps.values()))
        top_sigma = max(r["sigma"] for r in fp)
        by_tau = sorted((r["tau"], abs(r["gap_measured"])) for r in fp if r["sigma"] == top_sigma)
        f["gap_shrinks_with_tau"] = all(b[1] <= a[1] + 2e-3 for a, b in zip(by_tau, by_tau[1:]))
        lrs = th["lr_sweep"]
        small = min(r["lr"] for r in lrs)
        large = max(r["lr"] for r in lrs)
        bias = {(r["algorithm"], r["lr"]): abs(r["bias"]) for r in lrs}
        f["asgd_bias_small_lr"] = bias[("asgd", small)]
        f["asgd_bias_large_lr"] = bias[("asgd", large)]
        for a in ("rl", "rl2"):
            f[f"{a}_bias_small_lr"] = bias[(a, small)]
            f[f"{a}_bias_large_lr"] = bias[(a, large)]
        f["asgd_gap_flat"] = bias[("asgd", small)] > 0.7 * bias[("asgd", large)]
        f["rl_converges"] = all(bias[(a, small)] < bias[(a, large)] and bias[(a, small)] < 0.5 * bias[("asgd", small)] for a in ("rl", "rl2"))
        zs = th["zero_shift"]
        f["zero_shift_bias_on"], f["zero_shift_bias_off"] = abs(zs["on"]["bias"]), abs(zs["off"]["bias"])
        f["zero_shift_helps"] = abs(zs["on"]["bias"]) < abs(zs["off"]["bias"])
        g = [r for r in th["gamma"] if r["sigma"] == 0.0 and r["algorithm"] == "rl"]
        g0 = [r["mse"] for r in g if r["gamma"] == 0.0]
        gpos = [r["mse"] for r in g if r["gamma"] >= 0.1]
        if g0 and gpos:
            f["gamma0_mse"], f["gamma_pos_max_mse"] = g0[0], max(gpos)
            f["gamma0_settles_slower"] = g0[0] > max(gpos)
    tables = res.get("tables") or {}
    for name, rows in tables.items():
        dig = next(r for r in rows if r["row"] == "digital")["test_acc_mean"]
        per: dict[str, dict[str, float]] = {}
        for r in rows:
            if r["row"] != "digital":
                per.setdefault(r["response"], {})[r["row"]] = r["test_acc_mean"]
        f[f"{name}_digital"] = dig
        f[f"{name}_gaps"] = {resp: {row: round(acc - dig, 2) for row, acc in d.items()} for resp, d in per.items()}
        f[f"{name}_asgd_behind_everywhere"] = all(d["asgd"] <= dig for d in per.values())
        f[f"{name}_rl2_beats_asgd_everywhere"] = all(d["rl2"] >= d["asgd"] for d in per.values())
        worst = min(per, key=lambda k: per[k]["asgd"])
        f[f"{name}_asgd_worst_response"] = worst
        f[f"{name}_asgd_worst_gap"] = round(per[worst]["asgd"] - dig, 2)
        f[f"{name}_rl2_worst_gap"] = round(min(d["rl2"] for d in per.values()) - dig, 2)
        f[f"{name}_rl_worst_gap"] = round(min(d["rl"] for d in per.values()) - dig, 2)
    dflt = [r for r in res.get("runs", []) if r.get("defaults")]
    if dflt:
        best = {}
        for a in ("rl", "rl2"):
            mine = [r for r in dflt if r["algorithm"] == a]
            if mine:
                top = max(mine, key=lambda r: r["test_acc"])
                best[a] = {"transfer_lr": top["transfer_lr"], "test_acc": round(100 * top["test_acc"], 2)}
                best[a]["by_transfer_lr"] = {str(r["transfer_lr"]): round(100 * r["test_acc"], 2) for r in mine}
        f["defaults_best"] = best
    return f


# ----- figures --------------------------------------------------------------------------------------
def fig_fixed_point(th: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    taus = sorted({r["tau"] for r in th["fixed_point"]})
    for i, tau in enumerate(taus):
        rows = sorted((r for r in th["fixed_point"] if r["tau"] == tau), key=lambda r: r["sigma"])
        s = [r["sigma"] for r in rows]
        ax.plot(s, [r["predicted"] for r in rows], "-", color=f"C{i}", label=f"tau {tau:g}: E[g]F + E|g|G = 0")
        ax.plot(s, [r["measured"] for r in rows], "o", color=f"C{i}", label=f"tau {tau:g}: Analog SGD, measured")
    ax.axhline(THEORY_PROBLEM.w_star, color="k", ls=":", label="w* (optimum)")
    ax.set_xlabel("gradient noise sigma")
    ax.set_ylabel("fixed point of W")
    ax.set_title("Theorem 1: Analog SGD's fixed point (linear device)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_lr(th: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, a in enumerate(("asgd", "rl", "rl2")):
        rows = sorted((r for r in th["lr_sweep"] if r["algorithm"] == a), key=lambda r: r["lr"])
        ax.loglog([r["lr"] for r in rows], [max(abs(r["bias"]), 1e-5) for r in rows], "o-", color=f"C{i}", label=a)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("|E[Wbar] - w*| (stationary)")
    ax.set_title("Theorem 3: error against the learning rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_zero_shift(th: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, k in enumerate(("on", "off")):
        tr = th["zero_shift"][k]["trace"]
        ax.plot([10 * j for j in range(len(tr))], tr, color=f"C{i}", label=f"zero-shift {k}")
    ax.axhline(THEORY_PROBLEM.w_star, color="k", ls=":", label="w*")
    ax.set_xlabel("step")
    ax.set_ylabel("mean forward weight W + gamma P")
    ax.set_title("rl2, residual device with symmetric point 0.3")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_gamma(th: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, sigma in zip(axes, (0.0, THEORY_PROBLEM.sigma)):
        for i, a in enumerate(("rl", "rl2")):
            rows = sorted((r for r in th["gamma"] if r["algorithm"] == a and r["sigma"] == sigma), key=lambda r: r["gamma"])
            ax.semilogy([r["gamma"] for r in rows], [max(r["mse"], 1e-9) for r in rows], "o-", color=f"C{i}", label=a)
        ax.set_xlabel("mixing weight gamma")
        ax.set_ylabel("E(Wbar - w*)^2, second half of the run")
        ax.set_title(f"gradient noise sigma {sigma:g}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_table(rows: list[dict], title: str, path: Path) -> None:
    plt = _plt()
    responses = [r for r in dict.fromkeys(x["response"] for x in rows) if r != "-"]
    labels = [x for x in dict.fromkeys(x["row"] for x in rows) if x != "digital"]
    dig = next(r for r in rows if r["row"] == "digital")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(responses) + 2), 4))
    width = 0.8 / max(1, len(labels))
    for i, lab in enumerate(labels):
        xs, ys, es = [], [], []
        for j, resp in enumerate(responses):
            r = next((x for x in rows if x["row"] == lab and x["response"] == resp), None)
            if r:
                xs.append(j + (i - (len(labels) - 1) / 2) * width)
                ys.append(r["test_acc_mean"])
                es.append(r["test_acc_std"])
        ax.bar(xs, ys, width, yerr=es, label=lab, color=f"C{i + 1}", capsize=2)
    ax.axhline(dig["test_acc_mean"], color="C0", ls="--", label=f"digital {dig['test_acc_mean']:.2f}%")
    ax.set_xticks(range(len(responses)))
    ax.set_xticklabels(responses, fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    lo = min(x["test_acc_mean"] for x in rows)
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_lines(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str, path: Path, logx: bool = False) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=name)
    if logx:
        ax.set_xscale("symlog", linthresh=min([p[0] for v in series.values() for p in v if p[0] > 0] or [1e-3]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- the report ----------------------------------------------------------------------------------
def _fmt_acc(r: dict) -> str:
    s = f"{r['test_acc_mean']:.2f} +- {r['test_acc_std']:.2f}"
    return s + (f" ({r['diverged']} diverged)" if r["diverged"] else "")


def write_report(res: dict[str, Any], out: Path, command: str) -> Path:
    """Write everything into ``out``; return the path of REPORT.md."""
    out.mkdir(parents=True, exist_ok=True)
    s: Settings = res["settings"]
    f = findings(res)
    md: list[str] = []
    t = res["timings"]
    md += [
        "# fastanalog reproduce: Wu et al., \"Analog In-memory Training on General Non-ideal Resistive Elements\"",
        "",
        f"Command: `{command}` ({s.name} mode). Took {t['total'] / 60:.1f} min "
        f"(theory {t.get('theory', 0):.0f} s, training runs {t.get('training', 0):.0f} s) on {cpu_name()}, "
        f"{s.workers} worker process(es) of one torch thread each. fastanalog {fa.__version__}, torch {torch.__version__}.",
        "",
        f"The training runs used {_cpu_total(res) / 60:.1f} CPU-minutes in all (one thread each; wall time shrinks with "
        "--workers on an idle machine).",
        "",
        f"Update model: `{update_mode_name()}` (the library default)"
        + ("" if HAS_UPDATE_MODE else f"; {BATCH_MODE_UNAVAILABLE}, so the tables have no batch-mode column")
        + ".",
        "",
        "Paper numbers: where this report quotes one it says so next to ours; where it does not, "
        f"the cell says \"{NOT_QUOTED}\". Nothing here was tuned to a paper number.",
        "",
    ]
    figures: list[str] = []
    th = res.get("theory")
    if th:
        write_csv(out / "theory_fixed_point.csv", th["fixed_point"])
        write_csv(out / "theory_lr.csv", th["lr_sweep"])
        write_csv(out / "theory_gamma.csv", th["gamma"])
        write_csv(out / "theory_zero_shift.csv", [{"zero_shift": k, "bias": v["bias"], "mse": v["mse"]} for k, v in th["zero_shift"].items()])
        for name, fn in (("theory_fixed_point.png", fig_fixed_point), ("theory_lr.png", fig_lr), ("theory_zero_shift.png", fig_zero_shift), ("theory_gamma.png", fig_gamma)):
            fn(th, out / name)
            figures.append(name)
        p = THEORY_PROBLEM
        md += [
            "## Theory (scalar problems, the engine's own kernels)",
            "",
            f"`f(w) = (w - w*)^2 / 2`, w* = {p.w_star}, gradient `g = (Wbar - w*) + sigma z` set by hand (one sample, so the same in "
            f"per-sample and batch mode), many independent elements at once (one analog layer). Linear (soft-bounds) device, "
            f"dw_min 0.001, tau {THEORY_DEVICE['tau']} unless stated; rl/rl2 with transfer_lr {RL_TRANSFER_LR}, gamma 0.1.",
            "",
            "### Theorem 1: Analog SGD settles where E[g] F(w) + E|g| G(w) = 0",
            "",
            md_table(
                ["tau", "sigma", "measured fixed point", "predicted", "gap to w* (measured)", "gap (predicted)"],
                [[r["tau"], r["sigma"], f"{r['measured']:.4f}", f"{r['predicted']:.4f}", f"{r['gap_measured']:+.4f}", f"{r['gap_predicted']:+.4f}"] for r in th["fixed_point"]],
            ),
            "",
            f"Largest |measured - predicted|: {f['fixed_point_max_abs_error']:.4f}. The gap grows with sigma: "
            f"{'yes' if f['gap_grows_with_sigma'] else 'NO'}; it shrinks with tau: {'yes' if f['gap_shrinks_with_tau'] else 'NO'} "
            f"(the paper's Theorem 1 and SPEC section 6; {NOT_QUOTED} for the numbers). ![fixed point](theory_fixed_point.png)",
            "",
            "### Theorem 3: rl and rl2 converge exactly, Analog SGD keeps its gap",
            "",
            f"sigma {p.sigma}; `steps = {s.horizon:g} / lr`; bias = mean forward weight over the second half of the run minus w*.",
            "",
            md_table(
                ["algorithm", "lr", "steps", "bias", "E(Wbar - w*)^2"],
                [[r["algorithm"], r["lr"], r["steps"], f"{r['bias']:+.4f}", f"{r['mse']:.5f}"] for r in th["lr_sweep"]],
            ),
            "",
            f"Analog SGD's gap stays flat as the learning rate shrinks ({f['asgd_bias_large_lr']:.4f} -> {f['asgd_bias_small_lr']:.4f}): "
            f"{'yes' if f['asgd_gap_flat'] else 'NO'}; rl ({f['rl_bias_large_lr']:.4f} -> {f['rl_bias_small_lr']:.4f}) and rl2 "
            f"({f['rl2_bias_large_lr']:.4f} -> {f['rl2_bias_small_lr']:.4f}) shrink with it: {'yes' if f['rl_converges'] else 'NO'}. "
            "The squared error of rl/rl2 falls more slowly than their bias: at a small learning rate W and P oscillate "
            "(transfer and gradient form a lightly damped pair, damped by gamma * lr) for longer than these runs average over. "
            "![lr](theory_lr.png)",
            "",
            "### Zero-shift on an off-centre residual device",
            "",
            f"rl2, residual device linear on [{OFF_CENTRE['tau_min']}, {OFF_CENTRE['tau_max']}] (symmetric point 0.3), main device tau "
            f"{THEORY_DEVICE['tau']}: bias with zero-shift {th['zero_shift']['on']['bias']:+.4f}, without {th['zero_shift']['off']['bias']:+.4f} "
            f"(zero-shift helps: {'yes' if f['zero_shift_helps'] else 'NO'}). Without it P drifts toward its own symmetric point, which "
            "the transfer keeps writing into W. ![zero-shift](theory_zero_shift.png)",
            "",
            "### Mixing weight gamma from 0 to 0.5",
            "",
            md_table(
                ["sigma", "algorithm", "gamma", "bias", "E(Wbar - w*)^2"],
                [[r["sigma"], r["algorithm"], r["gamma"], f"{r['bias']:+.4f}", f"{r['mse']:.2e}"] for r in th["gamma"]],
            ),
            "",
            "gamma = 0 is Tiki-Taka. In these scalar runs gamma = 0 "
            + (
                f"settles more slowly (noise-free error {f.get('gamma0_mse', float('nan')):.2e} against at most "
                f"{f.get('gamma_pos_max_mse', float('nan')):.2e} for gamma >= 0.1): the forward weight W alone oscillates around w*, "
                "and gamma * P adds the damping. "
                if f.get("gamma0_settles_slower")
                else "does not settle more slowly than gamma >= 0.1. "
            )
            + "It does not fail outright here: on this quadratic with zero-shifted linear devices the W/P pair still settles near "
            "w*, and its bias is within a few tenths of a percent of that of gamma = 0.1. The paper's Figure 2 counterexample "
            f"(where gamma = 0 fails) is a different construction that this report does not reproduce ({NOT_QUOTED}). "
            "![gamma](theory_gamma.png)",
            "",
        ]
    tables = res.get("tables") or {}
    for spec in s.tables:
        rows = tables.get(spec.name)
        if not rows:
            continue
        write_csv(out / f"table_{spec.name}.csv", rows)
        fig_table(rows, f"{spec.model.upper()} on {spec.dataset}", out / f"table_{spec.name}.png")
        figures.append(f"table_{spec.name}.png")
        n_train = "all" if spec.n_train is None else f"{spec.n_train}"
        md += [
            f"## Accuracy: {spec.model.upper()} on {spec.dataset}",
            "",
            _model_text(spec)
            + f" Training samples: {n_train} of the training split after {spec.n_val} are held out for validation; "
            f"{spec.epochs} epochs at batch {spec.batch}; plain SGD, constant lr. Each row's learning rate is the best of "
            f"its grid ({_grid_text(spec)}) by validation accuracy (seed 0), then {spec.seeds} seed(s) at that lr; test accuracy on the full "
            f"test split, mean +- std over the seeds. rl/rl2: gamma 0.1, transfer_lr {RL_TRANSFER_LR}; Tiki-Taka: rl with gamma 0. "
            "Devices: dw_min 0.001, no variation; the residual device equals the main one, zero-shifted.",
            "",
            md_table(
                ["algorithm", "response", "lr (chosen)", "test accuracy (%)", "validation accuracy by lr (seed 0)", "paper"],
                [[r["row"], r["response"], r["lr"], _fmt_acc(r), r["val_acc_by_lr"], r["paper"]] for r in rows],
            ),
            "",
            f"Data: `table_{spec.name}.csv`. ![{spec.name}](table_{spec.name}.png)",
            "",
            f"Against digital ({f[f'{spec.name}_digital']:.2f}%), points per response: "
            + "; ".join(f"{resp}: " + ", ".join(f"{row} {gap:+.2f}" for row, gap in d.items()) for resp, d in f[f"{spec.name}_gaps"].items())
            + f". Analog SGD's worst: {f[f'{spec.name}_asgd_worst_gap']:+.2f} on {f[f'{spec.name}_asgd_worst_response']}; "
            f"worst of rl {f[f'{spec.name}_rl_worst_gap']:+.2f}, of rl2 {f[f'{spec.name}_rl2_worst_gap']:+.2f}. "
            "The paper's direction: Analog SGD behind digital and collapsing on steep responses, rl/rl2 within about a point of "
            "digital; a row that does not follow it is visible here as it is.",
            "",
        ]
    runs = res.get("runs", [])
    abl = [r for r in runs if r.get("ablation")]
    if abl:
        write_csv(out / "ablations.csv", abl)
        c2c = {row: [(r["level"], 100 * r["test_acc"]) for r in abl if r["ablation"] == "c2c" and r["row"] == row] for row in ("asgd", "rl2")}
        rn = {row: [(r["level"], 100 * r["test_acc"]) for r in abl if r["ablation"] == "read_noise" and r["row"] == row] for row in ("rl", "rl2")}
        c2c = {k: v for k, v in c2c.items() if v}
        rn = {k: v for k, v in rn.items() if v}
        fig_lines(c2c, "cycle-to-cycle noise c2c_std", "test accuracy (%)", "Cycle-to-cycle noise", out / "ablation_c2c.png")
        fig_lines({("rl (no buffer)" if k == "rl" else "rl2 (digital buffer)"): v for k, v in rn.items()}, "read noise of P (std, weight units)", "test accuracy (%)", "Read noise", out / "ablation_read_noise.png", logx=True)
        figures += ["ablation_c2c.png", "ablation_read_noise.png"]
        spec = s.tables[0]
        md += [
            "## Ablations",
            "",
            f"{spec.model.upper()} on {spec.dataset} as in its table, response {REFERENCE.label}, each algorithm at its chosen lr, "
            f"{s.ablation_seeds} seed(s); test accuracy (%). {NOT_QUOTED}.",
            "",
            md_table(["cycle-to-cycle noise", *c2c], [[lvl, *(f"{dict(v).get(lvl, float('nan')):.2f}" for v in c2c.values())] for lvl in s.c2c_levels]),
            "",
            md_table(
                ["read noise of P", *(("rl (no buffer)" if k == "rl" else "rl2 (buffer)") for k in rn)],
                [[lvl, *(f"{dict(v).get(lvl, float('nan')):.2f}" for v in rn.values())] for lvl in s.read_noise_levels],
            ),
            "",
            "Data: `ablations.csv`. ![c2c](ablation_c2c.png) ![read noise](ablation_read_noise.png)",
            "",
        ]
    dflt = [r for r in runs if r.get("defaults")]
    if dflt:
        write_csv(out / "defaults.csv", dflt)
        series = {a: [(r["transfer_lr"], 100 * r["test_acc"]) for r in dflt if r["algorithm"] == a] for a in ("rl", "rl2")}
        series = {k: v for k, v in series.items() if v}
        fig_lines(series, "transfer_lr", "test accuracy (%)", f"cnn, {s.defaults_steps} steps at batch 128", out / "defaults_transfer_lr.png", logx=True)
        figures.append("defaults_transfer_lr.png")
        ref = {r["row"]: 100 * r["test_acc"] for r in dflt if r["algorithm"] in ("digital", "asgd")}
        md += [
            "## Evidence for defaults: transfer_lr",
            "",
            f"`fastanalog train`'s default run shape: cnn on {s.defaults_dataset}, batch 128, lr {DEFAULTS_LR}, {s.defaults_steps} steps, "
            f"{REFERENCE.label}, gamma 0.1, all training samples, seed 0; test accuracy (%) per transfer_lr. "
            + "".join(f"{'Digital' if k == 'digital' else 'Analog SGD'} at the same lr: {v:.2f}. " for k, v in ref.items()),
            "",
            md_table(["transfer_lr", *series], [[b, *(f"{dict(v).get(b, float('nan')):.2f}" for v in series.values())] for b in s.defaults_transfer_lrs]),
            "",
            "Best: " + ", ".join(f"{a} at transfer_lr {v['transfer_lr']:g} ({v['test_acc']:.2f}%)" for a, v in f.get("defaults_best", {}).items())
            + ". ![transfer_lr](defaults_transfer_lr.png)"
            + (
                ""
                if s.defaults_dataset == "fashion-mnist"
                else f" ({s.name} mode: {s.defaults_dataset} stands in for Fashion-MNIST, a different problem whose best transfer_lr "
                "need not be the default's; the evidence for the defaults is the full report's Fashion-MNIST run.)"
            ),
            "",
        ]
    md += [
        "## The paper's CIFAR-10/100 ResNet runs",
        "",
        "Not run here (no GPU, no CIFAR data). On a GPU machine with CIFAR in torchvision's layout under DATA, batch 128:",
        "",
        "```",
        "fastanalog train --model resnet18 --dataset cifar10 --data-root DATA --algorithm rl2 --preset paper-power \\",
        "    --batch-size 128 --epochs EPOCHS --lr LR --schedule step --accelerator cuda",
        "```",
        "",
        "with `--model resnet50`, `--dataset cifar100` and `--algorithm digital|asgd|rl` for the other cells; EPOCHS, LR and the "
        f"schedule are the paper's ({NOT_QUOTED} here; see docs/REPRODUCE.md).",
        "",
        "## Files",
        "",
        "Figures: " + ", ".join(f"`{x}`" for x in figures) + ". Every training run: `runs.csv`. Findings as numbers: `summary.json`.",
        "",
    ]
    if runs:
        write_csv(out / "runs.csv", runs)
    summary = {"mode": s.name, "minutes": t["total"] / 60, "training_cpu_minutes": _cpu_total(res) / 60, "update_mode": update_mode_name(), "findings": f, "figures": figures}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    path = out / "REPORT.md"
    path.write_text("\n".join(md))
    return path


def _cpu_total(res: dict[str, Any]) -> float:
    seen: set[tuple] = set()
    total = 0.0
    for r in res.get("runs", []):
        key = tuple((k, str(v)) for k, v in r.items() if k not in ("table", "row", "ablation", "level", "defaults"))
        if key not in seen:
            seen.add(key)
            total += float(r.get("cpu_s", 0) or 0)
    return total


def _model_text(spec) -> str:
    if spec.model == "fcn":
        n_in = 784 if spec.dataset == "fashion-mnist" else 64
        return f"Model `fcn`: {n_in}-256-128-10 fully connected with ReLU (the paper's FCN)."
    return "Model `cnn`: conv5x5(16)-pool-conv5x5(32)-pool-FC128-FC10 with ReLU (`fastanalog train`'s cnn; the paper's CNN: not quoted)."


def _grid_text(spec) -> str:
    grids: dict[tuple[float, ...], list[str]] = {}
    for row in spec.rows():
        grids.setdefault(spec.grid(row), []).append(row)
    if len(grids) == 1:
        return ", ".join(f"{x:g}" for x in next(iter(grids)))
    return "; ".join(f"{', '.join(rows)}: {', '.join(f'{x:g}' for x in g)}" for g, rows in grids.items())


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)
