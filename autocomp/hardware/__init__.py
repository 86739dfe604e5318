"""Where latency truth comes from: devices that time ONNX models (and torch modules) for real.

``get_device("cpu")`` times with ONNX Runtime on this CPU, ``torch-cpu`` / ``cuda[:N]`` with eager
PyTorch, and ``remote://HOST:PORT`` on another machine running ``autocomp device serve``.
"""

from autocomp.hardware.base import Device, DeviceInfo, Measurement, OnnxModel
from autocomp.hardware.devices import ACCEPTED_SPECS, available_devices, get_device
from autocomp.hardware.onnx_io import load_onnx, static_input_shape
from autocomp.hardware.remote import RemoteDevice, make_server, serve
from autocomp.hardware.timing import SCREEN_TIMING, Timing

__all__ = [
    "ACCEPTED_SPECS",
    "SCREEN_TIMING",
    "Device",
    "DeviceInfo",
    "Measurement",
    "OnnxModel",
    "RemoteDevice",
    "Timing",
    "available_devices",
    "get_device",
    "load_onnx",
    "make_server",
    "serve",
    "static_input_shape",
]
