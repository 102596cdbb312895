"""``fastanalog reproduce``: the quick report's structure and the direction of its findings, and its pieces."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch

import fastanalog as fa
from fastanalog.reproduce import theory
from fastanalog.reproduce.common import BATCH_MODE_UNAVAILABLE, HAS_UPDATE_MODE, analog_config
from fastanalog.reproduce.experiments import ROWS, quick_settings
from fastanalog.reproduce.training import DeviceSpec, mean_std


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
    for name in ("theory_fixed_point.csv", "theory_lr.csv", "ablations.csv", "defaults.csv", "runs.csv"):
        assert (out / name).is_file(), name
    assert "Took" in text and "min" in text
    assert set(ROWS) >= {r["row"] for r in rows}

    # Directions. Theorem 1: the measured fixed point is the predicted one, and the gap grows with the noise.
    assert f["fixed_point_max_abs_error"] < 0.02
    assert f["gap_grows_with_sigma"] and f["gap_shrinks_with_tau"]
    # Theorem 3: Analog SGD's gap does not shrink with the learning rate; rl and rl2 do, and end well below it.
    assert f["asgd_gap_flat"] and f["rl_converges"]
    assert f["zero_shift_helps"]
    # Accuracy: on the steep response Analog SGD falls well behind digital and rl2 stays near it.
    steep = DeviceSpec("power", 0.1, 0.5).label
    gaps = f["digits-fcn_gaps"]
    assert f["digits-fcn_asgd_worst_response"] == steep
    assert gaps[steep]["asgd"] < -10
    assert gaps[steep]["rl2"] > gaps[steep]["asgd"] + 10
    assert gaps[steep]["rl2"] > -5
    assert summary["mode"] == "quick"
    assert len(quick_settings(2).tables) == 1
