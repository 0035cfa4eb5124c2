"""fp16 on activations past float16's range: the stress variant of the tiny checkpoint (issue 12).

Its residual stream and one feed-forward's intermediates exceed 65504 in float32 (flux2_tiny.stress),
as trained FLUX-family transformers' do. diffusers' own float16 pipeline draws NaN on it; the fp16
graph keeps its residual stream in float32 and scales each float16 matrix multiply into range.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from common.specs import Shapes

SHAPES = Shapes(height=128, width=128, max_sequence_length=64)
FP16_MAX = 65504.0


@pytest.fixture(scope="module")
def stress_checkpoint(_cache_dir):
    from flux2_tiny import ensure_tiny_checkpoint
    from flux2_tiny.config import DEFAULT

    return ensure_tiny_checkpoint(dataclasses.replace(DEFAULT, outlier_scale=3e4))


def _transformer_inputs(checkpoint):
    from common.specs import component_specs
    from export.checkpoint import open_checkpoint
    from export.verify.reference import ReferenceInputs

    opened = open_checkpoint(checkpoint)
    geometry = opened.geometry()
    spec = component_specs(geometry, SHAPES)["transformer"]
    feeds = ReferenceInputs(opened, geometry, SHAPES).feeds(spec)
    return opened, geometry, [torch.from_numpy(feeds[t.name]) for t in spec.inputs]


def test_stress_activations_leave_float16_range_and_diffusers_fp16_fails(stress_checkpoint):
    from common.reference_pipeline import reference_pipeline
    from export.checkpoint import open_checkpoint

    layers = open_checkpoint(stress_checkpoint).geometry().text_out_layers
    call = dict(prompt="a red fox", height=128, width=128, num_inference_steps=2, max_sequence_length=64,
                text_encoder_out_layers=layers, output_type="np")  # fmt: skip
    pipe = reference_pipeline(stress_checkpoint, device="cpu")
    peaks = {}

    def keep(name):
        def hook(_module, _args, output):
            peaks[name] = max(peaks.get(name, 0.0), float(output.abs().max()))

        return hook

    pipe.transformer.x_embedder.register_forward_hook(keep("residual"))
    pipe.transformer.transformer_blocks[0].ff.linear_in.register_forward_hook(keep("ff"))
    image = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert peaks["residual"] > FP16_MAX and peaks["ff"] > FP16_MAX, peaks
    assert np.isfinite(image).all()
    # Clipping at block ends, as diffusers' float16 blocks do, comes after the overflow.
    half = reference_pipeline(stress_checkpoint, dtype="float16", device="cpu")
    assert not np.isfinite(half(**call, generator=torch.Generator().manual_seed(0)).images).all()


def test_fp16_graph_module_is_finite_and_close_to_fp32(stress_checkpoint, tiny_checkpoint):
    from common.metrics import compare
    from export.verify.reference import build_graph_module

    for checkpoint, bound in ((stress_checkpoint, 1e-3), (tiny_checkpoint, 2e-3)):
        opened, geometry, args = _transformer_inputs(checkpoint)
        with torch.no_grad():
            expected = build_graph_module("transformer", opened, geometry, SHAPES, "fp32")(*args).numpy()
            actual = build_graph_module("transformer", opened, geometry, SHAPES, "fp16")(*args).numpy()
        metrics = compare(actual, expected)
        # measured: stress 3.7e-4, tiny default 9.2e-4 (1.4e-3 with the float16 stream before)
        assert metrics["finite"] and metrics["rel_l2"] < bound, (checkpoint.name, metrics)


@pytest.mark.slow
def test_fp16_export_of_the_stress_checkpoint(stress_checkpoint, tmp_path, monkeypatch):
    """The exported fp16 graph passes the fp16 bound; the plain float16 graph of before fails loudly."""
    import export.graphs.transformer as graph
    from common.errors import VerificationError
    from export.run import export_artifacts

    manifest = export_artifacts(
        model=str(stress_checkpoint), out=tmp_path / "fp16", precision="fp16", shapes=SHAPES,
        components=("transformer",), log=lambda m: None,
    )  # fmt: skip
    report = (tmp_path / "fp16" / "reports" / "export_check.json").read_text()
    assert manifest.precision == "fp16" and '"finite": true' in report

    monkeypatch.setattr(graph, "FP32_STREAM", False)
    with pytest.raises(VerificationError, match="NON-FINITE values"):
        export_artifacts(
            model=str(stress_checkpoint), out=tmp_path / "unscaled", precision="fp16", shapes=SHAPES,
            components=("transformer",), log=lambda m: None,
        )  # fmt: skip
    assert not (tmp_path / "unscaled").exists()
