"""A tiny configuration no other test uses: nothing may be hard-wired to the default preset."""

import json


def test_other_configuration_exports_and_verifies(variant_artifacts):
    manifest = json.loads((variant_artifacts / "manifest.json").read_text())
    # 4x VAE (3 blocks) -> 8 pixels per token: 24 x 40 tokens; 3 layers x 48 hidden
    assert manifest["geometry"]["text_out_layers"] == [1, 3, 5]
    assert manifest["components"]["transformer"]["inputs"][0]["shape"] == [1, 24 * 40, 16]
    assert manifest["components"]["text_encoder"]["outputs"][0]["shape"] == [1, 120, 144]
    assert manifest["components"]["vae"]["outputs"][0]["shape"] == [1, 3, 192, 320]
    report = json.loads((variant_artifacts / "reports" / "export_check.json").read_text())["components"]
    for component, entry in report.items():
        (metrics,) = entry["outputs"].values()
        assert entry["passed"] and metrics["rel_l2"] <= 1e-4, (component, metrics)


def test_other_configuration_generates_like_diffusers(variant_artifacts):
    from runtime.check import run_check

    report = run_check(artifacts=variant_artifacts, backend="ort", steps=3, seed=2, guidance=2.5, log=lambda m: None)
    assert report["end_to_end"]["psnr_db"] >= 40
    assert report["passed"]
