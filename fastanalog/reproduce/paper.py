"""The paper's numbers, quoted as printed, for the report to set beside its own.

Source: Wu et al., "Analog In-memory Training on General Non-ideal Resistive Elements: The
Impact of Response Functions", arXiv 2502.06309v3, Appendix K. Every number here is copied
from the paper; none was tuned to, and none is used to choose a setting of a run.

The paper's accuracy tables are on MNIST (FCN 784-256-128-10 with Sigmoid, batch 10, lr 0.1
digital and 0.05 analog, transfer lr 0.01, dw_min 1e-3, aihwkit with output noise and 8-bit
I/O, 3 repeats). The report runs Fashion-MNIST and scikit-learn's digits instead, so every
quote is labelled "paper, MNIST": the levels are not comparable, only the directions.

Response functions (K.1) are fastanalog's: power ``q+ = (1 - w/tau)^g``, ``q- = (1 + w/tau)^g``
is ``PowerResponse(tau, gamma=g)``; exponential ``q+ = (exp(g (1 - w/tau)) - 1) / (exp(g) - 1)``
(``q-`` with ``1 + w/tau``) is ``ExpResponse(tau, gamma=g)`` (``u = 1 -/+ w/tau`` in [0, 2]);
the linear ``q+ = (1 + c)(1 - w/tau)``, ``q- = (1 - c)(1 + w/tau)`` of Figure 2 is
``LinearResponse(tau, asymmetry=c)``.
"""

from __future__ import annotations

import re
from typing import Any

SOURCE = "arXiv 2502.06309v3, Appendix K"

# ----- Table 6: FCN on MNIST, power and exponential responses (K.3) -----------------------------
TABLE6_NAME = "Table 6"
TABLE6_DIGITAL = "98.17±0.05"
# (gamma_res, tau) -> (Power ASGD, Power TT/RL, Exp ASGD, Exp TT/RL)
TABLE6: dict[tuple[float, float], tuple[str, str, str, str]] = {
    (0.5, 0.6): ("96.01±0.26", "96.92±0.19", "<15.00", "97.27±0.07"),
    (0.5, 0.7): ("97.40±0.15", "97.05±0.05", "<15.00", "97.39±0.15"),
    (0.5, 0.8): ("97.38±0.10", "96.82±0.17", "94.00±0.63", "97.16±0.16"),
    (1.0, 0.6): ("<15.00", "97.39±0.05", "<15.00", "97.46±0.08"),
    (1.0, 0.7): ("<15.00", "97.33±0.05", "<15.00", "97.49±0.04"),
    (1.0, 0.8): ("<15.00", "97.34±0.09", "<15.00", "97.25±0.16"),
    (2.0, 0.6): ("<15.00", "96.93±0.15", "<15.00", "97.19±0.16"),
    (2.0, 0.7): ("<15.00", "97.27±0.02", "<15.00", "97.72±0.07"),
    (2.0, 0.8): ("<15.00", "97.18±0.04", "<15.00", "97.06±0.10"),
}
TABLE6_FAIL_NOTE = "<15.00 implies that Analog SGD fails completely at all trials"
TABLE6_CLAIM = (
    "Analog SGD works well only when the asymmetric is mild, i.e. gamma_res is small and tau is large, "
    "while Tiki-Taka ... achieves comparable accuracy with Digital SGD"
)

# ----- Table 5: cycle-to-cycle variation sigma_c on MNIST --------------------------------------
TABLE5_NAME = "Table 5"
TABLE5_DIGITAL = {"fcn": "98.17±0.05", "cnn": "99.09±0.04"}
# sigma_c -> (FCN ASGD, FCN TT, CNN ASGD, CNN TT)
TABLE5: dict[float, tuple[str, str, str, str]] = {
    0.1: ("97.22±0.21", "97.66±0.04", "92.68±0.45", "98.74±0.07"),
    0.3: ("96.97±0.12", "97.07±0.12", "93.36±0.55", "98.89±0.05"),
    0.6: ("96.33±0.21", "97.70±0.09", "93.07±0.53", "98.68±0.09"),
    0.9: ("95.99±0.15", "97.44±0.15", "91.87±0.48", "98.92±0.02"),
    1.2: ("96.19±0.20", "96.97±0.20", "91.57±0.58", "98.85±0.04"),
}
TABLE5_CLAIM = "not significantly affected by the cycle variation"

# ----- Table 1: CIFAR fine-tuning, power response gamma_res 3.0, tau 0.1 --------------------------
TABLE1_NAME = "Table 1"
TABLE1_COLUMNS = ("DSGD", "ASGD", "TT/RL", "TTv2", "RLv2")
TABLE1: dict[tuple[str, str], tuple[str, str, str, str, str]] = {
    ("CIFAR10", "ResNet18"): ("95.43±0.13", "84.47±3.40", "94.81±0.09", "95.31±0.05", "95.12±0.14"),
    ("CIFAR10", "ResNet34"): ("96.48±0.02", "95.43±0.12", "96.29±0.12", "96.60±0.05", "96.42±0.13"),
    ("CIFAR10", "ResNet50"): ("96.57±0.10", "94.36±1.16", "96.34±0.04", "96.63±0.09", "96.56±0.08"),
    ("CIFAR100", "ResNet18"): ("81.12±0.25", "68.98±1.01", "76.17±0.23", "78.56±0.29", "79.83±0.13"),
    ("CIFAR100", "ResNet34"): ("83.86±0.12", "78.98±0.55", "80.58±0.11", "81.81±0.15", "82.85±0.19"),
    ("CIFAR100", "ResNet50"): ("83.98±0.11", "79.88±1.26", "80.80±0.22", "82.82±0.33", "83.90±0.20"),
}
TABLE1_RESPONSE = "power, gamma_res 3.0, tau 0.1"
TABLE1_SETTINGS = (
    "ResNet18/34/50 pretrained on ImageNet, fine-tuned on CIFAR-10/100 with only the last fully connected layer analog; "
    "batch 128; lr 0.075 (digital and analog), transfer lr 0.01, Tiki-Taka gamma 0.4"
)
TABLE1_NOTE = "Table 3 (exponential response, gamma_res 4.0, tau 0.1) prints the identical numbers in v3, so only Table 1 is quoted"

# ----- Figure 2: least squares on a linear device with asymmetry cLin (K.2) ----------------------
FIGURE2 = {
    "problem": "f(W) = 1/2 ||A W - b||^2, A 100x50 Gaussian (variance 1.00^2), W* Gaussian (std 0.5), b = A W*",
    "device": "linear response q+ = (1 + cLin)(1 - w/tau), q- = (1 - cLin)(1 + w/tau), tau 3.5, dw_min 1e-4",
    "c_lins": (0.0, 0.1, 0.2, 0.3),
    "budget": "1000 gradient computations",
    "claims": (
        "Tiki-Taka significantly outperforms Analog SGD when cLin = 0. However, when cLin is perturbed from 0.1 to 0.3, "
        "Tiki-Taka degrades dramatically and even becomes worse than Analog SGD does.",
        "The error plateau in the order 1e-5 comes from the limited response granularity",
    ),
}
FIGURE2_TAU = 3.5
FIGURE2_DW_MIN = 1e-4

# ----- Figure 6: the mixing weight gamma (K.7; a plot, no numbers) -------------------------------
FIGURE6_CLAIM = "Tiki-Taka achieves a great accuracy gain from increasing gamma from 0 to 0.1, while the gain saturates after that"


# ----- lookups -------------------------------------------------------------------------------------
def parse(text: str) -> dict[str, Any]:
    """``"96.01±0.26"`` -> mean 96.01, std 0.26; ``"<15.00"`` -> below 15.0 (a complete failure)."""
    m = re.fullmatch(r"\s*<\s*([0-9.]+)\s*", text)
    if m:
        return {"mean": None, "std": None, "below": float(m.group(1))}
    mean, std = text.split("±")
    return {"mean": float(mean), "std": float(std), "below": None}


def _key(x: float) -> float:
    return round(float(x), 6)


def table6_cell(family: str, tau: float, gamma: float, dw_min: float = 0.001, c2c_std: float = 0.0) -> dict[str, str] | None:
    """The Table 6 cell of a response (``{"asgd": ..., "tt/rl": ...}``), or None when the paper has no such cell.

    Only variation-free power and exponential responses at dw_min 1e-3 (the paper's) are cells.
    """
    if family not in ("power", "exp") or c2c_std or abs(dw_min - 0.001) > 1e-12:
        return None
    row = {(_key(g), _key(t)): v for (g, t), v in TABLE6.items()}.get((_key(gamma), _key(tau)))
    if row is None:
        return None
    asgd, tt = (row[0], row[1]) if family == "power" else (row[2], row[3])
    return {"asgd": asgd, "tt/rl": tt}


def label(text: str, table: str, extra: str = "") -> str:
    """``"96.01±0.26 (paper, MNIST, Table 6)"``."""
    return f"{text} (paper, MNIST{', ' + extra if extra else ''}, {table})"


def table_paper_value(row: str, model: str, device: Any | None) -> str:
    """The "paper" column of an accuracy-table row (``row`` as in ``experiments.ROWS``, ``device`` a DeviceSpec or None)."""
    fcn = model == "fcn"
    extra = "" if fcn else "FCN; the paper has no CNN response table"
    if row == "digital":
        if fcn:
            return label(TABLE6_DIGITAL, TABLE6_NAME)
        return label(TABLE5_DIGITAL["cnn"], TABLE5_NAME, "CNN")
    if row == "rl2":
        return "no paper value (the MNIST tables have no RLv2 column)"
    if row == "asgd (batch mode)":
        return "no paper value (aihwkit writes per sample; the paper's ASGD is quoted beside the per-sample row)"
    cell = None if device is None else table6_cell(device.family, device.tau, device.gamma, device.dw_min, device.c2c_std)
    if cell is None:
        return "no paper value (not a Table 6 cell)"
    if row == "asgd":
        return label(cell["asgd"], TABLE6_NAME, extra)
    if row in ("rl", "tiki-taka (rl, gamma 0)"):
        return label(cell["tt/rl"], TABLE6_NAME, ("TT/RL column" + (", " + extra if extra else "")))
    return "no paper value"


def table5_value(row: str, level: float, model: str = "fcn") -> str:
    """The paper's Table 5 cell for an ablation row at cycle-to-cycle level ``level`` ("" where none)."""
    vals = {_key(k): v for k, v in TABLE5.items()}.get(_key(level))
    if vals is None:
        return ""
    col = {"asgd": 0, "tiki-taka (rl, gamma 0)": 1, "rl": 1}.get(row)
    if col is None:
        return ""
    if model == "cnn":
        col += 2
    return label(vals[col], TABLE5_NAME, model.upper())


def asgd_fails_in_paper(device: Any) -> bool | None:
    """Whether the paper's Analog SGD fails (<15%) on this response; None when it is not a Table 6 cell."""
    cell = table6_cell(device.family, device.tau, device.gamma, device.dw_min, device.c2c_std)
    if cell is None:
        return None
    return parse(cell["asgd"])["below"] is not None


def table6_tt_max_gap() -> float:
    """The largest gap of the paper's TT/RL cells below its digital SGD, points (Table 6)."""
    dig = parse(TABLE6_DIGITAL)["mean"]
    return max(dig - parse(v[i])["mean"] for v in TABLE6.values() for i in (1, 3))


def table5_span(col: int) -> float:
    """The spread (max - min) of one Table 5 column over the cycle-to-cycle levels, points."""
    vals = [parse(v[col])["mean"] for v in TABLE5.values()]
    return max(vals) - min(vals)
