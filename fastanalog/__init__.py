"""fastanalog: fast, exact simulation of training on analog in-memory computing devices."""

from .config import AnalogConfig
from .devices import ExpResponse, LinearResponse, PowerResponse, ResponseDevice, TableResponse
from .nn import AnalogConv1d, AnalogConv2d, AnalogLinear, analog_layers, convert_to_analog, total_pulses
from .optim import AnalogSGD

__version__ = "0.1.0"

__all__ = [
    "AnalogConfig",
    "AnalogConv1d",
    "AnalogConv2d",
    "AnalogLinear",
    "AnalogSGD",
    "ExpResponse",
    "LinearResponse",
    "PowerResponse",
    "ResponseDevice",
    "TableResponse",
    "analog_layers",
    "convert_to_analog",
    "total_pulses",
]
