"""tools/gpu_smoke.py on a machine without TensorRT: its metrics, --help, and a one-line refusal."""

import importlib.util
import math

import numpy as np
import pytest

from tests.support import REPO, run_cli


def _module():
    spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "tools" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_psnr_and_rel_l2():
    smoke = _module()
    image = np.linspace(-1, 1, 1000, dtype=np.float32)  # peak-to-peak 2, like a decoded image
    assert smoke.range_psnr(image, image) == math.inf
    assert math.isclose(smoke.range_psnr(image + 0.01, image), 10 * math.log10(4 / 1e-4), rel_tol=1e-4)  # 46.02 dB
    assert math.isclose(smoke.rel_l2(image * 1.01, image), 0.01, rel_tol=1e-4)


@pytest.mark.slow
def test_help_and_refusal_without_tensorrt():
    assert run_cli("tools/gpu_smoke.py", "--help").returncode == 0
    result = run_cli("tools/gpu_smoke.py", "--precision", "fp32")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error: gpu-smoke needs TensorRT and a CUDA GPU: TensorRT is not installed")
