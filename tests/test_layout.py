"""The layout shared by Python and the compiled kernels is written once: Python's packing module
and csrc/op_layout.h agree on family ids, algorithm ids and the device description's order."""

from __future__ import annotations

import re
from pathlib import Path

import fastanalog as fa
from fastanalog.ops import packing

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "op_layout.h"


def _enum(name: str) -> list[tuple[str, int | None]]:
    text = HEADER.read_text()
    body = re.search(r"enum\s+" + name + r"\s*:\s*int\s*\{(.*?)\};", text, re.S)
    assert body is not None, f"enum {name} not found in {HEADER}"
    out = []
    for entry in body.group(1).split(","):
        entry = entry.split("//")[0].strip()
        if entry:
            label, _, value = entry.partition("=")
            out.append((label.strip(), int(value) if value.strip() else None))
    return out


def _values(entries) -> dict[str, int]:
    values, nxt = {}, 0
    for label, value in entries:
        nxt = value if value is not None else nxt
        values[label] = nxt
        nxt += 1
    return values


def _snake(label: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", label[1:]).lower()


def test_family_ids_agree():
    header = {_snake(k): v for k, v in _values(_enum("Family")).items()}
    assert header == packing.FAMILY_IDS
    for cls in fa.devices.DEVICE_FAMILIES.values():
        assert packing.FAMILY_IDS[cls.family] == cls.family_id


def test_algorithm_ids_agree():
    header = {_snake(k): v for k, v in _values(_enum("Algorithm")).items()}
    assert header == packing.ALGORITHM_IDS


def test_device_description_order_agrees():
    fields = _values(_enum("DeviceField"))
    count = fields.pop("kDeviceFields")
    assert [_snake(k) for k, _ in sorted(fields.items(), key=lambda kv: kv[1])] == list(packing.DEVICE_FIELDS)
    assert count == len(packing.DEVICE_FIELDS)


def test_device_floats_follow_the_order():
    dev = fa.PowerResponse(tau_min=-0.5, tau_max=0.7, gamma=0.4, dw_min=0.01, asymmetry=0.1, c2c_std=0.2)
    packed = packing.pack_device(dev, tensor_id=3, array=1, zero_shift=True)
    floats = packing.device_floats(packed)
    assert floats[: len(packing.DEVICE_FIELDS)] == [float(getattr(packed, f)) for f in packing.DEVICE_FIELDS]
    assert floats[packing.DEVICE_FIELDS.index("family")] == 1.0
    assert floats[packing.DEVICE_FIELDS.index("zero_shift")] == 1.0
    assert floats[packing.DEVICE_FIELDS.index("shift")] == packed.shift != 0.0
