"""The torch device a command or an engine was asked for, checked before any work: torch
itself takes ``cuda`` on a host without a GPU (or ``cuda:3`` on a host with one) and fails
only at the first tensor, with a RuntimeError or, in a CPU build, an AssertionError."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device this host cannot run on, in one line (the CLI prints it and exits 2)."""


def torch_device(name: str) -> torch.device:
    """The device ``name`` names: ``auto`` (CUDA when there is one, else CPU), ``cpu``,
    ``cuda`` or ``cuda:N``; :class:`DeviceError` for anything else or a GPU not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device {name!r}: this runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r}: no usable CUDA GPU here (torch {torch.__version__}, "
                          f"CUDA {torch.version.cuda or 'not compiled in'})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r}: this host has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


__all__ = ["DeviceError", "torch_device"]
