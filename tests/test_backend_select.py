"""Choosing a backend: a pure function of the request, the precision's declaration and one probe."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import UsageError
from common.precision import precision
from runtime.backends.select import (
    AUTO_ORDER,
    BACKENDS,
    CHECK,
    SERVED,
    SERVED_BACKENDS,
    Availability,
    candidates,
    choose_backend,
    probe,
)

CPU = ("CPUExecutionProvider",)
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")
HERE = Path("/artifacts")


def _machine(trt: str | None = None, ort=CPU, torch_missing: str | None = None) -> Availability:
    reason = "TensorRT 10.15 on NVIDIA H200" if trt else "TensorRT is not installed (ModuleNotFoundError: x)"
    return Availability(HERE, AUTO_ORDER, trt, reason, ort, torch_missing)


@pytest.mark.parametrize(
    "name, machine, wanted",
    [
        ("fp32", _machine(trt="tensorrt"), "trt"),
        ("bf16", _machine(trt="rtx"), "trt"),
        ("fp32", _machine(), "ort"),
        ("fp16", _machine(), "ort"),
        ("bf16", _machine(), "torch"),  # the CPU provider has no bf16 kernels
        ("fp8", _machine(), "torch"),
        ("bf16", _machine(ort=CUDA), "ort"),  # onnxruntime-gpu runs it
        ("fp32", _machine(ort=()), "torch"),  # no onnxruntime installed
    ],
)
def test_auto_is_trt_else_ort_where_it_runs_the_precision_else_torch(name, machine, wanted):
    assert choose_backend("auto", precision(name), machine) == wanted


def test_a_named_backend_is_that_backend_or_the_reason_and_the_fix():
    assert choose_backend("ort", precision("fp32"), _machine()) == "ort"
    assert choose_backend("torch", precision("bf16"), _machine(trt="tensorrt")) == "torch"
    with pytest.raises(UsageError, match=r"CPU provider cannot run bf16 graphs \(/artifacts\); use --backend torch"):
        choose_backend("ort", precision("bf16"), _machine())
    with pytest.raises(UsageError, match="backend trt is not available: TensorRT is not installed"):
        choose_backend("trt", precision("fp32"), _machine())
    with pytest.raises(UsageError, match=r"backend torch needs torch and diffusers \(No module named 'diffusers'\)"):
        choose_backend("torch", precision("fp32"), _machine(torch_missing="No module named 'diffusers'"))
    with pytest.raises(UsageError, match="backend ort needs onnxruntime"):
        choose_backend("ort", precision("fp32"), _machine(ort=()))
    with pytest.raises(UsageError, match="unknown backend 'bogus'; choose one of auto, trt, ort, torch"):
        choose_backend("bogus", precision("fp32"), _machine())


def test_policies_are_arguments_not_rewrites():
    # runtime.check: an ort request ONNX Runtime cannot run here measures the torch backend instead.
    assert choose_backend("ort", precision("bf16"), _machine(), CHECK) == "torch"
    assert choose_backend("ort", precision("fp32"), _machine(), CHECK) == "ort"
    assert candidates("ort", CHECK) == ("ort", "torch") and candidates("ort") == ("ort",)
    # The Triton model: never torch, so a CPU node with bf16 artifacts is refused with every reason.
    assert candidates("auto", SERVED) == ("trt", "ort")
    with pytest.raises(UsageError, match="no backend here runs these bf16 artifacts: backend trt .*CPU provider"):
        choose_backend("auto", precision("bf16"), _machine(), SERVED)
    with pytest.raises(UsageError, match="unknown backend 'torch'; choose one of auto, trt, ort$"):
        choose_backend("torch", precision("fp32"), _machine(), SERVED)
    assert set(SERVED_BACKENDS) < set(BACKENDS)


def test_probe_asks_only_about_the_candidates(tmp_path):
    found = probe(tmp_path, candidates("ort"))
    assert found.probed == ("ort",) and found.trt_reason == "" and found.torch_missing is None
    assert found.ort_providers[-1] == "CPUExecutionProvider"
    with pytest.raises(AssertionError, match="backend trt was not probed"):
        choose_backend("trt", precision("fp32"), found)
