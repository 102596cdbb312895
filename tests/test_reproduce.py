"""``fastanalog reproduce``: the quick report's structure and the direction of its findings, and its pieces."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch

import fastanalog as fa
from fastanalog.reproduce import paper, theory
from fastanalog.reproduce.common import BATCH_MODE_UNAVAILABLE, HAS_UPDATE_MODE, analog_config
from fastanalog.reproduce.experiments import OLD_FULL_COST, ROWS, full_settings, quick_settings, total_cost
from fastanalog.reproduce.report import AGREES, DIFFERS, NOT_RUN, PARTLY
from fastanalog.reproduce.training import DeviceSpec, mean_std

VERDICTS = {AGREES, PARTLY, DIFFERS, NOT_RUN}


def test_folded_mean_matches_sampling():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400_000, generator=g, dtype=torch.float64)
    for mu, sigma in ((0.0, 1.0), (0.3, 0.5), (-1.0, 0.2)):
        assert float(theory.folded_mean(torch.tensor(mu), sigma)) == pytest.approx(float((mu + sigma * z).abs().mean()), abs=3e-3)
    assert float(theory.folded_mean(torch.tensor(-0.4), 0.0)) == pytest.approx(0.4)


def test_predicted_fixed_point_linear_device():
    dev = fa.LinearResponse(tau=0.5)
    assert theory.predicted_fixed_point(dev, 0.3, 0.0) == pytest.approx(0.3, abs=1e-6)
    # Linear device: F = 1, G = w / tau, so (w - w*) + E|g| w / tau = 0 has its root below w* and above 0.
    w = theory.predicted_fixed_point(dev, 0.3, 0.5)
    assert 0 < w < 0.3
    e = float(theory.folded_mean(torch.tensor(w - 0.3), 0.5))
    assert (w - 0.3) + e * w / 0.5 == pytest.approx(0.0, abs=1e-6)


def test_analog_config_update_field():
    cfg = analog_config("asgd", fa.LinearResponse())
    assert cfg.algorithm == "asgd"
    if HAS_UPDATE_MODE:
        assert analog_config("asgd", fa.LinearResponse(), update="batch").update == "batch"
    else:
        with pytest.raises(ValueError, match=re.escape(BATCH_MODE_UNAVAILABLE)):
            analog_config("asgd", fa.LinearResponse(), update="batch")


def test_device_spec_and_mean_std():
    assert isinstance(DeviceSpec("exp", 0.6, 2.0).build(), fa.ExpResponse)
    with pytest.raises(ValueError, match="unknown response family"):
        DeviceSpec("cubic").build()
    m, s = mean_std([1.0, 2.0, 3.0])
    assert (m, s) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_paper_response_functions_are_fastanalogs():
    """K.1's power and exponential responses and Figure 2's linear one are PowerResponse, ExpResponse and LinearResponse."""
    tau, g = 0.6, 2.0
    w = torch.linspace(-tau, tau, 101, dtype=torch.float64)
    p = fa.PowerResponse(tau=tau, gamma=g)
    assert torch.allclose(p.q_up(w).double(), (1 - w / tau) ** g, atol=1e-5)
    assert torch.allclose(p.q_down(w).double(), (1 + w / tau) ** g, atol=1e-5)
    e = fa.ExpResponse(tau=tau, gamma=g)
    assert torch.allclose(e.q_up(w).double(), torch.expm1(g * (1 - w / tau)) / math.expm1(g), atol=1e-5)
    assert torch.allclose(e.q_down(w).double(), torch.expm1(g * (1 + w / tau)) / math.expm1(g), atol=1e-5)
    for c in (0.0, 0.1, 0.3):
        lin = fa.LinearResponse(tau=3.5, asymmetry=c)
        w = torch.linspace(-3.5, 3.5, 101, dtype=torch.float64)
        assert torch.allclose(lin.q_up(w).double(), (1 + c) * (1 - w / 3.5), atol=1e-5)
        assert torch.allclose(lin.q_down(w).double(), (1 - c) * (1 + w / 3.5), atol=1e-5)
        assert float(lin.symmetric_point()) == pytest.approx(c * 3.5, abs=1e-6)


def test_paper_quotes():
    assert paper.parse("96.01±0.26") == {"mean": 96.01, "std": 0.26, "below": None}
    assert paper.parse("<15.00")["below"] == 15.0
    assert paper.table6_cell("power", 0.6, 0.5) == {"asgd": "96.01±0.26", "tt/rl": "96.92±0.19"}
    assert paper.table6_cell("exp", 0.8, 0.5) == {"asgd": "94.00±0.63", "tt/rl": "97.16±0.16"}
    assert paper.table6_cell("power", 0.1, 0.5) is None
    assert paper.table6_cell("power", 0.6, 0.5, c2c_std=0.3) is None
    dev = DeviceSpec("power", 0.6, 0.5)
    assert paper.table_paper_value("asgd", "fcn", dev) == "96.01±0.26 (paper, MNIST, Table 6)"
    assert paper.table_paper_value("digital", "fcn", None) == "98.17±0.05 (paper, MNIST, Table 6)"
    assert "96.92±0.19" in paper.table_paper_value("tiki-taka (rl, gamma 0)", "fcn", dev)
    assert "96.92±0.19" in paper.table_paper_value("rl", "fcn", dev)
    assert paper.table_paper_value("rl2", "fcn", dev).startswith("no paper value")
    assert "FCN" in paper.table_paper_value("asgd", "cnn", dev)
    assert paper.asgd_fails_in_paper(DeviceSpec("power", 0.6, 2.0)) is True
    assert paper.asgd_fails_in_paper(dev) is False
    assert paper.asgd_fails_in_paper(DeviceSpec("power", 0.1, 0.5)) is None
    assert paper.table5_value("asgd", 0.9) == "95.99±0.15 (paper, MNIST, FCN, Table 5)"
    assert paper.table5_value("rl2", 0.9) == ""
    assert paper.table6_tt_max_gap() == pytest.approx(98.17 - 96.82)


def test_full_settings_cells_and_budget():
    """The full tables are Table 6 cells (both families, a range of tau, steep ones), c2c at Table 5's levels, within the cost budget."""
    full = full_settings(2)
    for spec in full.tables:
        assert all(paper.table6_cell(d.family, d.tau, d.gamma) for d in spec.responses), spec.name
        assert any(paper.asgd_fails_in_paper(d) for d in spec.responses), spec.name
    fcn = full.tables[0].responses
    assert {d.family for d in fcn} == {"power", "exp"}
    assert len({d.tau for d in fcn if d.family == "power" and d.gamma == 0.5}) >= 2
    assert set(paper.TABLE5) <= set(full.c2c_levels)
    assert "tiki-taka (rl, gamma 0)" in full.c2c_rows
    assert total_cost(full) <= 1.35 * OLD_FULL_COST
    assert total_cost(quick_settings(2)) < 0.01 * OLD_FULL_COST


def test_least_squares_runs_small():
    algs = (theory.LsAlgorithm("asgd", "asgd", 0.005), theory.LsAlgorithm("rl", "rl", 0.02, gamma=0.1, zero_shift=True))
    rows = theory.least_squares_runs(
        [0.0, 0.3], algs, problem=theory.LeastSquares(rows=20, cols=5), tau=3.5, dw_min=1e-4, steps=30, replicas=2, transfer_lr=0.1
    )
    assert [(r["c_lin"], r["name"]) for r in rows] == [(0.0, "asgd"), (0.0, "rl"), (0.3, "asgd"), (0.3, "rl")]
    for r in rows:
        assert len(r["trace"]) == 4 and r["trace"][0] == pytest.approx(r["f0"])
        assert r["final"] < r["f0"]
        assert r["symmetric_point"] == pytest.approx(r["c_lin"] * 3.5)


def test_cli_rejects_bad_parts(capsys):
    from fastanalog.__main__ import main

    assert main(["reproduce", "--only", "theory,nonsense"]) == 2
    assert "--only" in capsys.readouterr().err


def test_quick_report(tmp_path):
    """The --quick report: a table with digital/asgd/rl/rl2 rows, >= 3 figures, CSVs, and the paper's directions."""
    from fastanalog.__main__ import main

    out = tmp_path / "report"
    assert main(["reproduce", "--quick", "--out", str(out), "--workers", "2"]) == 0
    text = (out / "REPORT.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    f = summary["findings"]

    # Structure: the accuracy table has the four algorithms, as markdown rows and in its CSV.
    for row in ("digital", "asgd", "rl", "rl2"):
        assert re.search(rf"^\| {re.escape(row)} \|", text, re.M), row
    with open(out / "table_digits-fcn.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {"digital", "asgd", "rl", "rl2"} <= {r["row"] for r in rows}
    assert ("asgd (batch mode)" in {r["row"] for r in rows}) == HAS_UPDATE_MODE
    assert all(r["paper"] for r in rows)
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert len(set(figures)) >= 3
    for name in figures:
        assert (out / name).stat().st_size > 1000
    for name in ("theory_fixed_point.csv", "theory_lr.csv", "ablations.csv", "defaults.csv", "runs.csv", "least_squares.csv"):
        assert (out / name).is_file(), name
    assert "Took" in text and "min" in text
    assert set(ROWS) >= {r["row"] for r in rows}

    # The paper's numbers beside ours: Table 6 cells in the table, the dataset caveat, Table 5, Figure 2 and Table 1.
    paper_col = {(r["row"], r["response"]): r["paper"] for r in rows}
    ref, steep = DeviceSpec("power", 0.6, 0.5).label, DeviceSpec("power", 0.6, 2.0).label
    assert paper_col[("digital", "-")] == "98.17±0.05 (paper, MNIST, Table 6)"
    assert paper_col[("asgd", ref)] == "96.01±0.26 (paper, MNIST, Table 6)"
    assert paper_col[("asgd", steep)] == "<15.00 (paper, MNIST, Table 6)"
    assert "96.93±0.15" in paper_col[("rl", steep)]
    assert paper_col[("rl2", ref)].startswith("no paper value")
    assert "arXiv 2502.06309v3, Appendix K" in text and "Datasets differ" in text
    assert "96.19±0.20 (paper, MNIST, FCN, Table 5)" in text
    assert "95.43±0.13" in text and "84.47±3.40" in text  # Table 1
    assert "## Figure 2" in text and "least_squares.png" in figures

    # Findings: one line per claim, each with a verdict.
    assert "## Findings" in text
    claims = {c["key"]: c for c in f["claims"]}
    expected = {"theorem1", "theorem3", "asgd_behind", "asgd_collapse", "asgd_mild", "rl_near_digital", "c2c", "fig2_tt_c0",
                "fig2_tt_degrades", "fig2_rl_fix", "fig2_plateau", "gamma_saturates"}  # fmt: skip
    assert expected <= set(claims)
    for c in claims.values():
        assert c["verdict"] in VERDICTS, c
        assert f"**{c['claim']}**" in text

    # Directions. Theorem 1: the measured fixed point is the predicted one, and the gap grows with the noise.
    assert f["fixed_point_max_abs_error"] < 0.02
    assert f["gap_grows_with_sigma"] and f["gap_shrinks_with_tau"]
    # Theorem 3: Analog SGD's gap does not shrink with the learning rate; rl and rl2 do, and end well below it.
    assert f["asgd_gap_flat"] and f["rl_converges"]
    assert f["zero_shift_helps"]
    # Accuracy: on the steep response (the paper's Analog SGD fails there) Analog SGD falls well behind digital, rl2 stays near it.
    gaps = f["digits-fcn_gaps"]
    assert f["digits-fcn_asgd_worst_response"] == steep
    assert gaps[steep]["asgd"] < -10
    assert gaps[steep]["rl2"] > gaps[steep]["asgd"] + 10
    assert gaps[steep]["rl2"] > -8  # 5 epochs, one seed: near digital, not yet within a point
    for key in ("theorem1", "theorem3", "asgd_behind", "asgd_mild"):
        assert claims[key]["verdict"] == AGREES, claims[key]
    assert claims["asgd_collapse"]["verdict"] in (AGREES, PARTLY)
    # Figure 2: Tiki-Taka without zero-shift degrades with cLin and ends behind Analog SGD; Residual Learning does not.
    for key in ("fig2_tt_degrades", "fig2_rl_fix"):
        assert claims[key]["verdict"] == AGREES, claims[key]
    assert summary["mode"] == "quick"
    assert len(quick_settings(2).tables) == 1


def _synthetic_results(s):
    """Results shaped like run_all's for settings ``s``, with made-up accuracies (steep responses break Analog SGD)."""
    from fastanalog.reproduce.experiments import LS_ALGORITHMS, LS_PROBLEM, choose_lrs, table_rows

    def acc(row, dev, seed):
        if row == "digital":
            return 0.90
        steep = dev.gamma >= 2.0 or (dev.family == "exp" and dev.gamma >= 0.5 and dev.tau < 0.7)
        base = {"asgd": 0.30 if steep else 0.85, "asgd (batch mode)": 0.5 if steep else 0.87}.get(row, 0.893)
        return base + 0.001 * seed

    runs = []
    for spec in s.tables:
        for row, dev in spec.cells():
            d = dev or s.tables[0].responses[0]
            for lr in spec.grid(row):
                for seed in range(spec.seeds):
                    a = acc(row, d, seed) - (0.01 if lr != spec.grid(row)[0] else 0.0)
                    runs.append({"table": spec.name, "row": row, "response": d.label, "lr": lr, "seed": seed, "val_acc": a, "test_acc": a,
                                 "diverged": False, "cpu_s": 1.0, "algorithm": ROWS[row][0]})  # fmt: skip
    chosen = {spec.name: choose_lrs(spec, runs) for spec in s.tables}
    for seed in range(s.c2c_seeds):
        for lvl in s.c2c_levels:
            for row in s.c2c_rows:
                runs.append({"ablation": "c2c", "row": row, "level": lvl, "test_acc": 0.88 - 0.005 * lvl + 0.001 * seed, "cpu_s": 1.0})
    for lvl in s.read_noise_levels:
        for row in ("rl", "rl2"):
            runs.append({"ablation": "read_noise", "row": row, "level": lvl, "test_acc": 0.88 - lvl, "cpu_s": 1.0})
    for a in s.defaults_algorithms:
        for beta in s.defaults_transfer_lrs if a in ("rl", "rl2") else (0.1,):
            runs.append({"defaults": a, "row": a, "algorithm": a, "transfer_lr": beta, "test_acc": 0.8, "cpu_s": 1.0})
    fp = [{"tau": t, "sigma": sg, "w_star": 0.3, "measured": 0.3 - 0.1 * sg / t, "predicted": 0.3 - 0.1 * sg / t,
           "gap_measured": -0.1 * sg / t, "gap_predicted": -0.1 * sg / t} for t in s.fp_taus for sg in s.fp_sigmas]  # fmt: skip
    lrs = [{"algorithm": a, "lr": lr, "steps": 10, "bias": (-0.12 if a == "asgd" else -lr), "mse": 0.01} for a in ("asgd", "rl", "rl2") for lr in s.lr_grid_theory]
    gam = [{"sigma": sg, "algorithm": a, "gamma": g, "bias": 0.0, "mse": 1e-4 / (1 + 20 * g)} for sg in (0.0, 0.5) for a in ("rl", "rl2") for g in s.gammas]
    zs = {k: {"bias": b, "mse": 0.01, "trace": [0.0, 0.1, 0.2]} for k, b in (("on", 0.001), ("off", 0.1))}
    algs = tuple(LS_ALGORITHMS[n] for n in s.ls_algorithms)
    ls = []
    for update in s.ls_updates:
        if update == "batch" and not HAS_UPDATE_MODE:
            continue
        ls += theory.least_squares_runs([0.0, 0.1, 0.2, 0.3], algs, problem=theory.LeastSquares(rows=20, cols=5), tau=3.5, dw_min=1e-4,
                                        steps=20, replicas=2, transfer_lr=0.1, update=update)  # fmt: skip
    assert LS_PROBLEM.rows == 100
    res = {"settings": s, "timings": {"total": 60.0, "theory": 10.0, "training": 50.0}, "runs": runs, "chosen_lr": chosen,
           "theory": {"fixed_point": fp, "lr_sweep": lrs, "gamma": gam, "zero_shift": zs, "least_squares": ls},
           "tables": {spec.name: table_rows(spec, runs, chosen[spec.name]) for spec in s.tables}}  # fmt: skip
    return res


def test_full_report_layout(tmp_path):
    """The full setting's report (from made-up results): every table has its paper column, c2c has Table 5, findings judge."""
    from fastanalog.reproduce.report import write_report

    s = full_settings(2)
    path = write_report(_synthetic_results(s), tmp_path, "fastanalog reproduce")
    text = path.read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    claims = {c["key"]: c for c in summary["findings"]["claims"]}
    for spec in s.tables:
        assert f"## Accuracy: {spec.model.upper()} on {spec.dataset}" in text
        with open(tmp_path / f"table_{spec.name}.csv") as fh:
            rows = list(csv.DictReader(fh))
        for r in rows:
            if r["row"] in ("asgd", "rl", "tiki-taka (rl, gamma 0)"):
                assert "(paper, MNIST" in r["paper"] and "Table 6" in r["paper"], r
    assert "99.09±0.04 (paper, MNIST, CNN, Table 5)" in text
    for lvl in paper.TABLE5:
        assert paper.table5_value("asgd", lvl) in text and paper.table5_value("tiki-taka (rl, gamma 0)", lvl) in text
    assert ("| batch | asgd |" in text) == HAS_UPDATE_MODE  # Figure 2 in batch mode too
    assert all(c["verdict"] in VERDICTS for c in claims.values())
    for key in ("asgd_behind", "asgd_collapse", "asgd_mild", "c2c", "rl_near_digital", "gamma_saturates"):
        assert claims[key]["verdict"] != NOT_RUN, claims[key]
    assert claims["asgd_behind"]["verdict"] == AGREES and claims["asgd_collapse"]["verdict"] == PARTLY
    assert claims["rl_near_digital"]["verdict"] == AGREES and claims["c2c"]["verdict"] == AGREES
