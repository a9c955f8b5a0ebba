"""Which TensorRT a plan can be built with, and in which precision (pure: no TensorRT here).

TensorRT 11 removed the weak-typing builder API the FP16 build uses (``BuilderFlag.FP16``,
``PREFER_PRECISION_CONSTRAINTS``, ``Builder.platform_has_fast_fp16``); ``pip install tensorrt``
gives 11.x, where the FP16 build died in an AttributeError. There the plan is FP32.
"""

from __future__ import annotations

import pytest

from models.tensorrt_build import TensorRTUnavailable, plan_precision, tensorrt_major


@pytest.mark.parametrize("version", ["10.0.1", "10.3.0", "10.13.3.9", "10.16.1.11"])
def test_tensorrt_10_builds_the_fp16_plan(version: str) -> None:
    assert plan_precision(version, fp16=True) == "fp16"
    assert plan_precision(version, fp16=False) == "fp32"


@pytest.mark.parametrize("version", ["11.0.0", "11.4.0.106", "12.0"])
def test_tensorrt_11_has_no_fp16_builder_flag_and_builds_fp32(version: str) -> None:
    assert plan_precision(version, fp16=True) == "fp32"
    assert plan_precision(version, fp16=False) == "fp32"


def test_tensorrt_before_10_is_refused_in_one_line() -> None:
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT 8\.6\.1 is too old.*TensorRT 10 API"):
        plan_precision("8.6.1", fp16=True)


def test_an_unreadable_version_is_refused() -> None:
    assert tensorrt_major(" 10.13.3.9 ") == 10
    with pytest.raises(TensorRTUnavailable, match="cannot read the TensorRT version"):
        tensorrt_major("dev")
