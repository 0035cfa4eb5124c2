"""runtime.generate draws what diffusers' Flux2Pipeline draws; runtime.check reports it."""

import json

import numpy as np
import pytest

from tests.support import assert_one_line_error, run_cli


def test_ort_fp32_matches_diffusers(export_tiny):
    from runtime.check import run_check

    report = run_check(artifacts=export_tiny("fp32"), backend="ort", steps=4, log=lambda m: None)
    assert report["backend"] == "ort-cpu"
    assert report["end_to_end"]["psnr_db"] >= 40
    assert report["end_to_end"]["ssim"] > 0.999
    for name, metrics in report["components"].items():
        assert metrics["rel_l2"] <= 1e-4, name
    assert report["passed"]
    saved = json.loads((export_tiny("fp32") / "reports" / "runtime_check.json").read_text())
    assert saved["end_to_end"]["psnr_db"] == pytest.approx(report["end_to_end"]["psnr_db"])


def test_torch_backend_matches_diffusers(export_tiny):
    from runtime.check import run_check

    report = run_check(artifacts=export_tiny("fp32"), backend="torch", steps=3, seed=7, log=lambda m: None)
    assert report["backend"] == "torch-cpu"
    assert report["end_to_end"]["psnr_db"] >= 50


def test_fp16_passes_and_bf16_says_what_ran(export_tiny):
    from runtime.check import run_check

    fp16 = run_check(artifacts=export_tiny("fp16"), backend="ort", steps=3, log=lambda m: None)
    assert fp16["passed"] and fp16["end_to_end"]["psnr_db"] >= 35
    bf16 = run_check(artifacts=export_tiny("bf16"), backend="auto", steps=3, log=lambda m: None)
    assert bf16["backend"] == "torch-cpu"
    assert any("cannot run bf16" in note for note in bf16["notes"])
    assert bf16["passed"]


def test_generate_cli_writes_png_and_sidecar_per_prompt(export_tiny, tmp_path):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\nune rue de Paris la nuit\n", encoding="utf-8")
    out = tmp_path / "images"
    result = run_cli("-m", "runtime.generate", "--artifacts", str(export_tiny("fp32")), "--prompt-file", str(prompts),
                     "--steps", "2", "--seed", "5", "--num-images", "2", "--backend", "ort", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["000-00-seed5.png", "000-01-seed5.png", "001-00-seed6.png", "001-01-seed6.png"]
    first = np.asarray(Image.open(pngs[0]))
    assert first.shape == (256, 256, 3)
    assert not np.array_equal(first, np.asarray(Image.open(pngs[1])))  # two noises per prompt
    sidecar = json.loads(pngs[2].with_suffix(".json").read_text())
    assert sidecar["prompt"] == "une rue de Paris la nuit" and sidecar["seed"] == 6 and sidecar["backend"] == "ort-cpu"
    assert sidecar["precision"] == "fp32" and len(sidecar["manifest_sha256"]) == 64
    assert {"text_encoder_s", "denoise_s", "vae_s", "total_s", "backend_s"} <= set(sidecar["timings"])


def test_a_prompt_past_max_sequence_length_is_cut_with_a_note_and_recorded(export_tiny, tmp_path):
    """Cut as diffusers cuts it (parity), but said: the note names both counts, the sidecar keeps them."""
    import re

    from common.tokenizer import PromptTokenizer

    artifacts = export_tiny("fp32")
    long = ("a red fox in fresh snow at dawn, soft light " * 12).strip()  # as --prompt-file reads a line
    tokenizer = PromptTokenizer(artifacts / "tokenizer", 128, pipeline_class="Flux2Pipeline")
    length = tokenizer.untruncated_length(long)
    assert length > 128
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{long}\na red fox\n", encoding="utf-8")
    out = tmp_path / "images"
    result = run_cli("-m", "runtime.generate", "--artifacts", str(artifacts), "--prompt-file", str(prompts),
                     "--steps", "1", "--backend", "ort", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = [line.split("\r")[-1] for line in result.stderr.splitlines() if "note: prompt" in line]
    assert len(notes) == 1, result.stderr
    assert re.search(rf"note: prompt 0 has {length} tokens\b.* take 128 \(max_sequence_length\)", notes[0]), notes[0]
    cut = json.loads((out / "000-00-seed0.json").read_text())
    assert cut["prompt_tokens"] == length and cut["prompt_truncated"] is True
    whole = json.loads((out / "001-00-seed1.json").read_text())
    assert whole["prompt_tokens"] == tokenizer.untruncated_length("a red fox") < 128
    assert whole["prompt_truncated"] is False


def test_second_image_of_a_seed_matches_diffusers_batch(export_tiny):
    """--num-images K draws one [K, ...] noise tensor from the seed, as diffusers does."""
    import torch

    from common.metrics import psnr
    from common.reference_pipeline import reference_pipeline
    from runtime.artifacts import open_artifacts
    from runtime.backends.ort import OrtBackend
    from runtime.pipeline import Flux2Runtime, Sampling

    artifacts = open_artifacts(export_tiny("fp32"))
    runtime = Flux2Runtime(artifacts, OrtBackend(artifacts.folder, artifacts.manifest))
    sampling = Sampling("a lighthouse", seed=3, steps=2, guidance=3.0, num_images=2)
    ours = [image for _, image, _ in runtime.generate(sampling, progress=False)]
    pipe = reference_pipeline(artifacts.manifest.source.checkpoint, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(prompt="a lighthouse", height=256, width=256, num_inference_steps=2, guidance_scale=3.0, num_images_per_prompt=2,
                     generator=torch.Generator().manual_seed(3), max_sequence_length=128,
                     text_encoder_out_layers=tuple(artifacts.geometry.text_out_layers), output_type="np").images  # fmt: skip
    assert psnr(ours[1], reference[1]) >= 40
    assert psnr(ours[0], reference[0]) >= 40


def test_failure_mid_batch_keeps_finished_images(export_tiny, tmp_path, monkeypatch):
    from runtime import generate as generate_module
    from runtime.pipeline import Flux2Runtime

    original = Flux2Runtime.decode
    calls = {"n": 0}

    def flaky_decode(self, latents, timings):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return original(self, latents, timings)

    monkeypatch.setattr(Flux2Runtime, "decode", flaky_decode)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="device lost"):
        generate_module.generate(
            artifacts=export_tiny("fp32"),
            prompts=["one", "two"],
            steps=1,
            backend="ort",
            out=out,
            progress=False,
            log=lambda m: None,
        )
    assert [p.name for p in out.glob("*.png")] == ["000-00-seed0.png"]
    assert not list(out.glob(".*"))  # no temporary file left


def test_import_path_stays_light():
    code = (
        "import sys, time; t = time.perf_counter(); import runtime.generate, runtime.pipeline, runtime.backends.ort, runtime.scheduler; "
        "print(time.perf_counter() - t); print(sorted(m for m in ('diffusers', 'transformers', 'torch') if m in sys.modules))"
    )
    result = run_cli("-c", code)
    assert result.returncode == 0, result.stderr
    seconds, loaded = result.stdout.strip().splitlines()
    assert loaded == "[]"


def _generate(*args):
    return run_cli("-m", "runtime.generate", *args)


def test_generate_errors(export_tiny, tmp_path):
    good = str(export_tiny("fp32"))
    assert_one_line_error(
        _generate("--artifacts", str(tmp_path / "none"), "--prompt", "x", "--out", str(tmp_path / "o")),
        str(tmp_path / "none"),
        "does not exist",
    )
    assert_one_line_error(
        _generate("--artifacts", good, "--prompt", "x", "--steps", "0", "--out", str(tmp_path / "o")), "--steps 0"
    )
    assert_one_line_error(
        _generate("--artifacts", good, "--prompt", "x", "--guidance", "nan", "--out", str(tmp_path / "o")),
        "--guidance nan",
    )
    assert_one_line_error(
        _generate("--artifacts", good, "--prompt-file", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")),
        "missing.txt",
    )
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(
        _generate("--artifacts", good, "--prompt", "x", "--out", str(blocker)), str(blocker), "is a file"
    )
    assert_one_line_error(
        _generate("--artifacts", good, "--prompt", "x", "--out", "/proc/flux2-images"),
        "/proc/flux2-images",
        "not writable",
    )
    assert_one_line_error(
        _generate("--artifacts", good, "--prompt", "x", "--backend", "trt", "--out", str(tmp_path / "o")),
        "backend trt is not available",
    )
    assert_one_line_error(
        _generate("--artifacts", good, "--prompt", "x", "--backend", "cuda", "--out", str(tmp_path / "o")), "'cuda'"
    )
    assert_one_line_error(
        _generate("--artifacts", good, "--prompt", "x", "--out", str(blocker / "sub")), str(blocker), "is a file"
    )
    assert not (tmp_path / "o").exists()  # the folder is made with the first image: no refusal left one


def test_incomplete_and_incompatible_artifacts(export_tiny, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(export_tiny("fp32"), broken)
    (broken / "vae.onnx.data").unlink()
    assert_one_line_error(
        _generate("--artifacts", str(broken), "--prompt", "x", "--out", str(tmp_path / "o")),
        "vae.onnx.data",
        "incomplete",
    )
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["format_version"] = 99
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(
        _generate("--artifacts", str(broken), "--prompt", "x", "--out", str(tmp_path / "o")), "version 99", "--force"
    )
    assert not (tmp_path / "o").exists()


def test_bf16_on_ort_cpu_is_refused_with_the_fix(export_tiny, tmp_path):
    result = _generate(
        "--artifacts", str(export_tiny("bf16")), "--prompt", "x", "--backend", "ort", "--out", str(tmp_path / "o")
    )
    assert_one_line_error(result, "bf16", "--backend torch")
    assert not (tmp_path / "o").exists()


def test_prompt_and_guidance_reach_the_tiny_image(export_tiny):
    """Without this, the 40 dB end-to-end bound could not tell a wrong text path from a right one."""
    from common.metrics import psnr
    from runtime.artifacts import open_artifacts
    from runtime.backends.ort import OrtBackend
    from runtime.pipeline import Flux2Runtime, Sampling

    opened = open_artifacts(export_tiny("fp32"))
    runtime = Flux2Runtime(opened, OrtBackend(opened.folder, opened.manifest))

    def image(prompt, guidance):
        return next(runtime.generate(Sampling(prompt, seed=0, steps=4, guidance=guidance), progress=False))[1]

    fox = image("a red fox in the snow", 4.0)
    assert psnr(fox, image("a bowl of ramen, studio light", 4.0)) < 40
    assert psnr(fox, image("a red fox in the snow", 1.0)) < 35


def test_generate_under_an_ascii_locale(export_tiny, tmp_path):
    """Triton's Python stub (and many containers) run with an ASCII locale; tokenizer files are UTF-8."""
    import os
    import subprocess
    import sys

    from tests.support import REPO

    vocabulary = (export_tiny("fp32") / "tokenizer" / "tokenizer.json").read_bytes()
    assert max(vocabulary) > 127  # byte-level BPE tokens as UTF-8, as in every real tokenizer.json
    env = dict(os.environ, PYTHONPATH=str(REPO), LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    probe = subprocess.run([sys.executable, "-c", "import locale; print(locale.getpreferredencoding(False))"],
                           env=env, capture_output=True, text=True)  # fmt: skip
    assert probe.stdout.strip().upper() in ("ANSI_X3.4-1968", "ASCII", "US-ASCII"), probe.stdout
    result = subprocess.run(
        [sys.executable, "-m", "runtime.generate", "--artifacts", str(export_tiny("fp32")), "--prompt", "ein Fuchs im Schnee",
         "--steps", "1", "--backend", "ort", "--out", str(tmp_path / "images")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "images").glob("*.png"))) == 1
