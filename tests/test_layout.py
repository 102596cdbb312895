"""The layout shared by Python and the compiled kernels is written once: Python's packing module
and csrc/op_layout.h agree on family ids, algorithm ids and the device description's order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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


def test_step_scalars_order_agrees():
    fields = _values(_enum("StepField"))
    count = fields.pop("kStepFields")
    ordered = [_snake(k) for k, _ in sorted(fields.items(), key=lambda kv: kv[1])]
    assert ordered == ["step_" + f for f in packing.STEP_FIELDS]
    assert count == len(packing.STEP_FIELDS)


def test_step_floats_follow_the_order():
    config = fa.AnalogConfig(algorithm="rl2", gamma=0.3, transfer_lr=0.4, read_noise=0.02, buffer="ema", threshold=2.0,
                             max_pulses=5)  # fmt: skip
    step = dict(zip(packing.STEP_FIELDS, packing.step_floats(config, lr=0.125, flag=True)))
    assert step == {"lr": 0.125, "gamma": 0.3, "transfer_lr": 0.4, "read_noise": 0.02, "threshold": 2.0, "max_pulses": 5.0, "flag": 1.0}


def test_table_size_counts_the_samples():
    dev = fa.TableResponse(tau=0.6, dw_min=0.001, up=(2.0, 1.0, 0.0), down=(0.0, 1.0, 2.0))
    config = fa.AnalogConfig(algorithm="rl", device=dev, residual_device=fa.PowerResponse(tau=0.6, gamma=0.5))
    packed = packing.pack_op_config(config)
    n = len(packing.DEVICE_FIELDS)
    assert packed.devices[packing.DEVICE_FIELDS.index("table_size")] == 6.0
    assert packed.devices[n + packing.DEVICE_FIELDS.index("table_size")] == 0.0
    assert packed.tables == (2.0, 1.0, 0.0, 0.0, 1.0, 2.0)


@pytest.mark.parametrize(
    "config",
    [
        fa.AnalogConfig(algorithm="asgd", device=fa.LinearResponse(tau_min=-0.5, tau_max=0.7, dw_min=0.01, d2d_std=0.1, variation_seed=2**64 - 3)),
        fa.AnalogConfig(algorithm="rl", device=fa.ExpResponse(tau=0.8, gamma=-1.2, c2c_std=0.1), read_noise=0.01, max_pulses=4,
                        residual_device=fa.TableResponse(tau=0.6, up=(2.0, 1.0, 0.0), down=(0.0, 1.0, 2.0), variation_seed=7),
                        zero_shift=False),
        fa.AnalogConfig(algorithm="rl2", device=fa.PowerResponse(tau=0.6, gamma=0.5, asymmetry=0.1, d2d_std=0.2), buffer="ema",
                        transfer_lr=0.5, threshold=3.0, gamma=0.0),
    ],
    ids=["asgd", "rl", "rl2"],
)
def test_packed_configs_unpack_to_equal_launch_arguments(config):
    """What the ops carry rebuilds a config that every launcher packs and keys the same way."""
    packed = packing.pack_op_config(config)
    step = packing.step_floats(config, lr=0.01, flag=config.buffer == "ema")
    back = packing.unpack_op_config(config.algorithm, tuple(step), packed.devices, packed.tables, packed.seeds)
    assert packing.pack_op_config(back) == packed
    assert packing.step_floats(back, lr=0.01, flag=back.buffer == "ema") == step
    for tensor_id in (0, 5):
        assert packing.pack_config(back, tensor_id) == packing.pack_config(config, tensor_id)
    assert back.pulse_cap == config.pulse_cap and back.zero_shift == config.zero_shift


def test_variation_key_of_the_kernels():
    """csrc/philox.h's variation_key is philox.variation_key (the kernels derive the keys from seeds and tensor ids)."""
    text = (HEADER.parent / "philox.h").read_text()
    assert "0x13198A2E03707344" in text
    from fastanalog.ops import philox

    assert philox._VARIATION_DOMAIN == 0x13198A2E03707344
