"""A tiny configuration no other test uses: nothing may be hard-wired to the default preset."""

from tests.conftest import run_cli


def test_other_configuration_exports_and_verifies(tmp_path):
    checkpoint = tmp_path / "variant"
    made = run_cli(
        "-m", "export.tiny", "--out", str(checkpoint),
        "--set", "text_hidden_size=48", "--set", "text_num_layers=5", "--set", "text_num_heads=6",
        "--set", "text_num_kv_heads=3", "--set", "text_out_layers=1,3,5",
        "--set", "num_layers=1", "--set", "num_single_layers=3", "--set", "num_attention_heads=3",
        "--set", "attention_head_dim=24", "--set", "axes_dims_rope=6,6,6,6",
        "--set", "latent_channels=4", "--set", "vae_block_out_channels=8,16,16",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    out = tmp_path / "artifacts"
    result = run_cli(
        "-m", "export", "--model", str(checkpoint), "--out", str(out),
        "--height", "192", "--width", "320", "--max-sequence-length", "96",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    # 4x VAE (3 blocks) -> 8 pixels per token: 24 x 40 tokens; 3 layers x 48 hidden
    assert manifest["components"]["transformer"]["inputs"][0]["shape"] == [1, 24 * 40, 16]
    assert manifest["components"]["text_encoder"]["outputs"][0]["shape"] == [1, 96, 144]
    assert manifest["components"]["vae"]["outputs"][0]["shape"] == [1, 3, 192, 320]
    report = json.loads((out / "reports" / "export_check.json").read_text())["components"]
    for component, entry in report.items():
        (metrics,) = entry["outputs"].values()
        assert entry["passed"] and metrics["rel_l2"] <= 1e-4, (component, metrics)
