"""bench.engine_build's results file: a run of some precisions replaces their rows and keeps the rest."""

import json

from bench.engine_build import merged


def _row(precision, seconds, strip=False):
    return {"precision": precision, "strip_weights": strip, "seconds": seconds}


def test_a_run_of_one_precision_keeps_the_other_rows_of_the_same_slice(tmp_path):
    results = tmp_path / "engine_build.json"
    earlier = {"model": "slice", "shapes": [1024, 1024, 512], "machine": {"cpus": 2},
               "builds": [_row("fp16", 1.0), _row("fp8", 2.0), _row("nvfp4", 3.0)]}  # fmt: skip
    results.write_text(json.dumps(earlier))
    data = merged(results, "slice", (1024, 1024, 512), [_row("nvfp4", 4.0), _row("bf16", 5.0)])
    assert [(r["precision"], r["seconds"]) for r in data["builds"]] == [
        ("fp16", 1.0), ("bf16", 5.0), ("fp8", 2.0), ("nvfp4", 4.0)
    ]  # fmt: skip
    assert data["builds"][0]["machine"] == {"cpus": 2}  # kept rows keep the machine they were measured on
    assert "cpus" in data["builds"][1]["machine"]
    other_shapes = merged(results, "slice", (256, 256, 64), [_row("nvfp4", 4.0)])
    assert [r["precision"] for r in other_shapes["builds"]] == ["nvfp4"]  # another size is another table
