"""Polygraphy on the tiny exports, as a user runs it (docs/engines.md, "Polygraphy").

- `POLYGRAPHY_USE_TENSORRT_RTX=1 polygraphy convert X.onnx -o X.plan`: TensorRT-RTX builds each graph
  through Polygraphy's own loaders, on this CPU;
- `polygraphy run X.onnx --onnxrt` on the export check's inputs, against PyTorch fp32's outputs
  written by tools/polygraphy_reference.py, held to the precision's bounds (common.precision): it
  measures the export report's rel L2, and a reference moved past the bound makes it exit non-zero.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.manifest import read_manifest
from common.tensorrt_env import module_status
from tests.support import REPO

HAS_RTX, RTX_REASON = module_status("rtx")
# The console script beside this interpreter: what `make setup` installs from the dev extra.
POLYGRAPHY = Path(sys.executable).with_name("polygraphy")
# fp32 and fp16: the precisions whose graphs ONNX Runtime's CPU provider runs (both exported by the suite).
PRECISIONS = ("fp32", "fp16")
L2_LINE = re.compile(r"L2 Norm: ([0-9.eE+-]+) \(tolerance: ([0-9.eE+-]+)\) \| (PASSED|FAILED)")


def _tool():
    """tools/polygraphy_reference.py (outside the packages), registered so its dataclass resolves its module."""
    name = "polygraphy_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "polygraphy_reference.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def polygraphy(*args: str, rtx: bool = False) -> subprocess.CompletedProcess:
    assert POLYGRAPHY.is_file(), f"no {POLYGRAPHY}: `make setup` installs the dev extra (polygraphy==0.53.6)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLYGRAPHY_")}  # never autoinstall
    env["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if rtx else "0"
    return subprocess.run([str(POLYGRAPHY), *args], env=env, capture_output=True, text=True, timeout=300)


def _said(result: subprocess.CompletedProcess) -> str:
    return (result.stdout + result.stderr)[-3000:]


@pytest.mark.skipif(not HAS_RTX, reason=f"needs tensorrt_rtx (the dev extra installs it): {RTX_REASON}")
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_polygraphy_convert_builds_a_tensorrt_rtx_plan(export_tiny, tmp_path, precision, component):
    artifacts = export_tiny(precision)
    entry = read_manifest(artifacts).components[component]
    plan = tmp_path / f"{component}.plan"
    result = polygraphy(
        "convert", str(artifacts / entry.file), "-o", str(plan), "--compute-capabilities", "8.9", "12.0", rtx=True
    )
    assert result.returncode == 0, _said(result)
    assert "Setting 2 target compute capabilities: [(8, 9), (12, 0)]" in result.stdout, _said(result)
    flags = re.search(r"Flags\s+\| \[(.*)\]", result.stdout).group(1).split(", ")
    # Strongly typed (every TensorRT-RTX network is), and TF32 left on: CreateConfigRTX has no tf32
    # setting, where engines.build clears it so fp32 stays fp32 (docs/engines.md, "Polygraphy").
    assert "STRONGLY_TYPED" in flags and "TF32" in flags, flags
    # A full plan carries the weights: at least the external-data bytes (the rest is kernels).
    weights = sum(size for name, size in entry.bytes.items() if name != entry.file)
    assert plan.stat().st_size >= weights > 0, (plan.stat().st_size, weights)


@pytest.fixture(scope="module")
def polygraphy_data(export_tiny, tmp_path_factory):
    """precision -> {component: ComponentData}: the tool's input and reference files for that export."""
    tool, done = _tool(), {}

    def get(precision: str):
        if precision not in done:
            out = tmp_path_factory.mktemp(f"polygraphy-{precision}")
            written = tool.write_polygraphy_data(artifacts=export_tiny(precision), out=out, log=lambda m: None)
            done[precision] = {data.component: data for data in written}
        return done[precision]

    return get


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("component", ["text_encoder", "transformer", "vae"])
def test_polygraphy_run_onnxrt_measures_the_export_checks_error(export_tiny, polygraphy_data, precision, component):
    data = polygraphy_data(precision)[component]
    assert data.onnxrt_runs and data.max_rel_l2 == {"fp32": 1e-4, "fp16": 1e-2}[precision]
    result = polygraphy(*data.onnxrt_args())
    assert result.returncode == 0, _said(result)
    assert (
        "Cosine Similarity | All outputs matched" in result.stdout
        and f"Output: {data.output} is valid" in result.stdout
    )
    l2, threshold, verdict = L2_LINE.search(result.stdout).groups()
    assert verdict == "PASSED" and math.isclose(float(threshold), data.l2_threshold, rel_tol=1e-4)
    # Same graph, inputs and reference as the export check: Polygraphy measures the rel L2 it recorded.
    report = json.loads((export_tiny(precision) / "reports" / "export_check.json").read_text(encoding="utf-8"))
    recorded = report["components"][component]["outputs"][data.output]["rel_l2"]
    measured = float(l2) / (data.l2_threshold / data.max_rel_l2)
    assert math.isclose(measured, recorded, rel_tol=1e-2, abs_tol=1e-7), (measured, recorded)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_polygraphy_run_fails_on_a_reference_past_the_bound(polygraphy_data, tmp_path, precision):
    from polygraphy.comparator import RunResults

    data = polygraphy_data(precision)["vae"]
    results = RunResults.load(str(data.reference))
    expected = results[0][1][0][data.output]
    noise = np.random.default_rng(0).standard_normal(expected.shape).astype(np.float32)
    # rel L2 of twice the bound from the reference alone (the graph's own error is far below it).
    noise *= 2 * data.max_rel_l2 * np.linalg.norm(expected) / np.linalg.norm(noise)
    results[0][1][0][data.output] = expected + noise
    moved = tmp_path / "vae.reference.json"
    results.save(str(moved))
    args = data.onnxrt_args()
    args[args.index(str(data.reference))] = str(moved)
    result = polygraphy(*args)
    assert result.returncode != 0, _said(result)
    l2, _threshold, verdict = L2_LINE.search(result.stdout).groups()
    assert verdict == "FAILED" and float(l2) > data.l2_threshold, _said(result)


def test_the_compare_arguments_name_the_output_and_the_bounds():
    tool = _tool()
    data = tool.ComponentData(
        "vae", Path("a/vae.onnx"), Path("p/vae.inputs.json"), Path("p/vae.reference.json"), "fp16", "image",
        max_rel_l2=1e-2, l2_threshold=1.6016312, min_cosine=0.9999, onnxrt_runs=True,
    )  # fmt: skip
    assert data.onnxrt_args() == [
        "run", "a/vae.onnx", "--onnxrt", "--load-inputs", "p/vae.inputs.json", "--load-outputs", "p/vae.reference.json",
        "--compare", "l2", "cosine_similarity", "--l2-threshold", "image:1.60163",
        "--cosine-similarity-threshold", "image:0.9999", "--validate",
    ]  # fmt: skip
    assert data.engine_args(Path("a/engines/rtx/vae.plan"))[:5] == [
        "run", "a/engines/rtx/vae.plan", "--model-type", "engine", "--trt"
    ]  # fmt: skip
