"""Analog layers and model conversion."""

from .layers import AnalogConv1d, AnalogConv2d, AnalogLayerMixin, AnalogLinear, analog_layers, convert_to_analog, total_pulses

__all__ = ["AnalogConv1d", "AnalogConv2d", "AnalogLayerMixin", "AnalogLinear", "analog_layers", "convert_to_analog", "total_pulses"]
