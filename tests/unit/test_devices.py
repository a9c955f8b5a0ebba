"""models/devices.py: the one check of a device name, shared by train, eval and the torch engine."""

from __future__ import annotations

import pytest
import torch

from models.devices import DeviceError, torch_device


def test_auto_and_cpu() -> None:
    assert torch_device("cpu") == torch.device("cpu")
    assert torch_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name, says", [("foo", "unknown device"), ("mps", "cpu or cuda"), ("meta", "cpu or cuda")])
def test_names_that_are_no_device_here_are_one_line_errors(name: str, says: str) -> None:
    with pytest.raises(DeviceError, match=says) as info:
        torch_device(name)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_a_gpu_this_host_lacks_is_refused_before_any_tensor() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(DeviceError, match="GPU"):
        torch_device(f"cuda:{count}")  # one past the last GPU, or any GPU on a CPU host
