"""Faults injected for real: damaged bytes, NaN weights, kill -9, a full disk, read-only folders, two writers, signals.

Each test asserts what the tool answers (exit code, the one line, what it names) and that nothing
partial is left. Small shapes (128x128, 64 tokens, 2 steps) keep the file fast.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.errors import ArtifactsError, UsageError, VerificationError
from common.integrity import STAMP_NAME
from common.metrics import compare
from common.precision import TOLERANCES
from common.specs import Shapes
from common.staging import folder_lock, owner_tag, remove_stale_staging
from tests.support import REPO

TINY = Shapes(height=128, width=128, max_sequence_length=64)
ROOMY = Shapes(height=128, width=128, max_sequence_length=128)
# One graph is enough where the fault is in the writing, not in what is written.
EXPORT_FLAGS = (
    "--components",
    "vae",
    "--height",
    "128",
    "--width",
    "128",
    "--max-sequence-length",
    "64",
    "--skip-check",
)


def _default_sigint():
    # A background job starts with SIGINT ignored, and Python keeps an inherited SIG_IGN: restore it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(*args: str, preexec_fn=_default_sigint) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def _finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _run(*args: str, prefix: tuple[str, ...] = (), preexec_fn=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [*prefix, sys.executable, *args]
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn
    )


def _error_line(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The run ended with exit `code` and one `error:` line (the last one), no traceback, naming `needles`."""
    lines = [line.split("\r")[-1].strip() for line in result.stderr.splitlines()]
    errors = [line for line in lines if line.startswith("error:")]
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and errors[0] == [line for line in lines if line][-1], result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _staging(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.tmp-*"))


def _wait_for(predicate, process: subprocess.Popen, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        if process.poll() is not None:
            pytest.fail(f"the process ended ({process.returncode}) before {what}: {process.stderr.read()}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"timed out waiting for {what}")


def _generate(artifacts: Path, out: Path, *extra: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return _run(
        "-m", "runtime.generate", "--artifacts", str(artifacts), "--prompt", "a red fox", "--steps", "2",
        "--out", str(out), *extra, prefix=prefix,
    )  # fmt: skip


@pytest.fixture(scope="module")
def artifacts(export_tiny) -> Path:
    return export_tiny("fp32")


def _copy(artifacts: Path, target: Path) -> Path:
    shutil.copytree(artifacts, target)
    return target


# --- integrity ---------------------------------------------------------------------------------


def _overwrite_middle(data: Path) -> None:
    """64 bytes in the middle, same size, as bit rot or a bad copy leaves it, even with the mtime put back."""
    size, stat = data.stat().st_size, data.stat()
    with open(data, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(bytes(64))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == size


def test_overwritten_weight_bytes_are_refused_before_any_image(artifacts, tmp_path):
    damaged = _copy(artifacts, tmp_path / "damaged")
    data = damaged / "transformer.onnx.data"
    _overwrite_middle(data)
    result = _generate(damaged, tmp_path / "images")
    _error_line(result, 2, "transformer.onnx.data", "damaged", "manifest says", "--force")
    assert not list((tmp_path / "images").glob("*.png"))
    verified = _run("-m", "runtime.verify", str(damaged))
    _error_line(verified, 2, "transformer.onnx.data", "damaged")


def test_a_wrong_backend_name_is_refused_before_any_artifact_is_read(artifacts, tmp_path):
    from tests.support import assert_one_line_error

    damaged = _copy(artifacts, tmp_path / "damaged")
    _overwrite_middle(damaged / "transformer.onnx.data")
    result = _run("-m", "runtime.generate", "--artifacts", str(damaged), "--backend", "bogus", "--prompt", "x",
                  "--out", str(tmp_path / "images"))  # fmt: skip
    assert_one_line_error(result, "'bogus'", "--backend")
    assert "sha256" not in result.stderr
    assert not (tmp_path / "images").exists()


def test_verified_stamp_skips_unchanged_files_and_rehashes_changed_ones(artifacts, tmp_path):
    from common.integrity import verify_artifacts
    from common.manifest import read_manifest

    folder = _copy(artifacts, tmp_path / "a")
    manifest = read_manifest(folder)
    files = manifest.files()
    assert {"transformer.onnx.data", "tokenizer/tokenizer.json"} <= set(files)
    assert sorted(verify_artifacts(folder, manifest)) == sorted(files)  # a copy: new inodes, all hashed
    assert verify_artifacts(folder, manifest) == []  # unchanged: trusted from the stamp
    assert sorted(verify_artifacts(folder, manifest, force=True)) == sorted(files)  # --verify
    (folder / "vae.onnx.data").touch()
    assert verify_artifacts(folder, manifest) == ["vae.onnx.data"]
    stamp = json.loads((folder / STAMP_NAME).read_text())
    assert stamp["vae.onnx.data"]["sha256"] == files["vae.onnx.data"]
    data = folder / "text_encoder.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\x7f\x7f\x7f\x7f")
    with pytest.raises(ArtifactsError, match="text_encoder.onnx.data has sha256"):
        verify_artifacts(folder, manifest)
    with pytest.raises(ArtifactsError, match="text_encoder.onnx.data has sha256"):  # not stamped as good
        verify_artifacts(folder, manifest)


def test_a_fresh_export_is_stamped_so_the_first_start_hashes_nothing(artifacts):
    from common.integrity import verify_artifacts
    from common.manifest import read_manifest

    # export_tiny's folder is only read by tests; its stamp was written by the export.
    stamp = json.loads((artifacts / STAMP_NAME).read_text())
    assert "transformer.onnx.data" in stamp
    hashed = verify_artifacts(artifacts, read_manifest(artifacts))
    assert "transformer.onnx.data" not in hashed


def test_engine_build_refuses_damaged_onnx(tmp_path):
    from engines.build import build_engines
    from tests.fake_trt import FakeTrt
    from tests.test_engines_build import PLATFORM, _artifacts

    folder, _ = _artifacts(tmp_path / "a")
    onnx_file = folder / "vae.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-1] + b"\x00")
    trt = FakeTrt()
    with pytest.raises(ArtifactsError, match="vae.onnx has sha256 .* the manifest says"):
        build_engines(artifacts=folder, target="tensorrt", trt=trt, platform=PLATFORM, log=lambda m: None)
    assert not trt.calls  # refused before TensorRT saw anything


# --- NaN / Inf ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with one transformer weight set to NaN (in its bf16 shard, as published)."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("nan") / "checkpoint")
    index = next((folder / "transformer").glob("*.safetensors.index.json"))
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    name = next(n for n in sorted(weight_map) if n.endswith("attn.to_out.0.weight"))
    path = folder / "transformer" / weight_map[name]
    tensors = load_file(path)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def test_nan_weights_name_the_stage_exit_1_and_write_no_image(artifacts, tmp_path):
    from common.manifest import sha256_file

    # What an export of a checkpoint holding NaN weights writes (when its check is skipped): the
    # transformer's weights all NaN, the manifest's sha256 matching them.
    folder = _copy(artifacts, tmp_path / "nan")
    data = folder / "transformer.onnx.data"
    data.write_bytes(np.full(data.stat().st_size // 4, np.nan, np.float32).tobytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["components"]["transformer"]["sha256"][data.name] = sha256_file(data)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = _generate(folder, tmp_path / "images", "--num-images", "2")
    line = _error_line(result, 1, "transformer output velocity", "NaN/Inf", "at denoising step 1 of 2", "no image")
    assert "text_encoder" not in line  # the first bad stage is named, not a later one
    assert not (tmp_path / "images").exists()  # made with the first image: none was written


@pytest.mark.slow
def test_export_check_fails_on_nan_weights_in_the_checkpoint(nan_checkpoint, tmp_path):
    from export.run import export_artifacts

    with pytest.raises(VerificationError, match=r"gives \d+ NaN/Inf values in velocity; the weights in .*transformer"):
        export_artifacts(
            model=str(nan_checkpoint), out=tmp_path / "x", components=("transformer",), shapes=TINY, log=lambda m: None
        )
    assert not (tmp_path / "x").exists() and not _staging(tmp_path, "x")


def test_numerics_judgement_counts_non_finite_outputs():
    expected = np.linspace(-1, 1, 1000, dtype=np.float32)
    actual = expected.copy()
    actual[[3, 500, 999]] = [np.nan, np.inf, -np.inf]
    metrics = TOLERANCES["fp32"].judge(actual, expected)
    assert metrics["passed"] is False and metrics["non_finite"] == 3
    assert "NON-FINITE values (3 inf/nan)" in TOLERANCES["fp32"].describe("velocity", metrics)
    assert compare(expected, expected)["non_finite"] == 0


def test_runtime_check_table_reports_non_finite_count():
    from runtime.check import format_table

    good = {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0, "passed": True, "finite": True, "non_finite": 0}
    bad = {**good, "rel_l2": float("nan"), "passed": False, "finite": False, "non_finite": 2048}
    report = {
        "artifacts": "a", "precision": "fp32", "backend": "ort-cpu", "reference": "diffusers", "passed": False,
        "components": {"text_encoder": good, "transformer": bad, "vae": good},
        "end_to_end": {"psnr_db": float("nan"), "min_psnr_db": 40.0, "ssim": float("nan"), "passed": False},
    }  # fmt: skip
    table = format_table(report)
    assert "FAIL (2048 NaN/Inf values)" in table and "overall: FAIL" in table


def test_count_non_finite_numpy_and_torch():
    import torch

    from runtime.pipeline import count_non_finite

    array = np.ones((4, 8), np.float32)
    assert count_non_finite(array) == 0 and count_non_finite(torch.from_numpy(array)) == 0
    array[1, 2], array[3, 3] = np.nan, np.inf
    assert count_non_finite(array) == 2
    assert count_non_finite(array.astype(np.float16)) == 2
    assert count_non_finite(torch.from_numpy(array).bfloat16()) == 2


# --- killed runs, two writers ------------------------------------------------------------------


@pytest.mark.slow
def test_killed_export_is_cleaned_by_the_next_and_a_second_export_is_refused(tiny_checkpoint, tmp_path):
    from export.run import export_artifacts

    out = tmp_path / "out"
    first = _popen("-m", "export", "--model", str(tiny_checkpoint), "--out", str(out), *EXPORT_FLAGS)
    staged = _wait_for(lambda: _staging(tmp_path, "out"), first, "the first export's staging folder")[0]
    first.send_signal(signal.SIGSTOP)  # frozen while it holds the folder: the second one is sure to meet it
    try:
        second = _run("-m", "export", "--model", str(tiny_checkpoint), "--out", str(out), *EXPORT_FLAGS)
        _error_line(second, 2, str(out), "being written by another export", f"pid {first.pid}")
        assert _staging(tmp_path, "out") == [staged]  # the live one's folder is left alone
        assert remove_stale_staging(tmp_path, log=lambda m: None) == []
    finally:
        first.kill()  # kill -9: no cleanup runs
        _finish(first)
    assert first.returncode == -signal.SIGKILL and staged.is_dir() and not out.exists()
    logs = []
    export_artifacts(
        model=str(tiny_checkpoint), out=out, components=("vae",), shapes=TINY, skip_check=True, log=logs.append
    )
    assert any(f"removed {staged}" in line and f"process {first.pid}" in line for line in logs), logs
    assert not staged.exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no lock file


def test_staging_of_live_or_other_hosts_stays(tmp_path):
    mine = tmp_path / f".x.tmp-{owner_tag()}-abcd1234"
    mine.mkdir()
    dead = tmp_path / f".x.tmp-{2**22 + 7}-1@{owner_tag().split('@')[1]}-zzzz0000"  # above any pid_max
    dead.mkdir()
    (dead / "weights").write_bytes(b"x" * 1000)
    other = tmp_path / ".x.tmp-1-1@elsewhere-yyyy0000"
    other.mkdir()
    plain = tmp_path / ".x.tmp-abcdefgh"  # no owner recorded (an older version): not ours to judge
    plain.mkdir()
    logs = []
    assert remove_stale_staging(tmp_path, name="x", log=logs.append) == [dead]
    assert mine.is_dir() and other.is_dir() and plain.is_dir() and not dead.exists()
    assert any("host elsewhere" in line for line in logs)


def test_folder_lock_refuses_a_second_holder_and_is_released(tmp_path):
    target = tmp_path / "out"
    with folder_lock(target, "export"):
        with pytest.raises(UsageError, match=f"{target} is being written by another export \\(pid {os.getpid()}"):
            with folder_lock(target, "export"):
                pass
    assert not list(tmp_path.iterdir())
    with folder_lock(target, "export"):
        pass


# --- full disk, read-only folders --------------------------------------------------------------


def _file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_full_disk_during_export_is_one_line_exit_2_and_nothing_left(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = _run(
        "-m", "export", "--model", str(tiny_checkpoint), "--out", str(out), *EXPORT_FLAGS,
        preexec_fn=_file_size_limit(100_000),  # the first weights file is ~300 kB
    )  # fmt: skip
    _error_line(result, 2, "export failed: File too large", str(out), "free there", "nothing partial")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_saving_an_image(artifacts, tmp_path):
    from common.errors import StorageError
    from runtime.generate import save_image

    def apply_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    image = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)  # ~49 kB as PNG
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    apply_limit()
    try:
        with pytest.raises(StorageError, match="saving image 000-00-seed0.png failed: File too large"):
            save_image(tmp_path, "000-00-seed0", image, {"seed": 0})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, handler)
    assert list(tmp_path.iterdir()) == []


def test_not_enough_space_is_refused_before_writing(tiny_checkpoint, tmp_path, monkeypatch):
    from common.errors import StorageError
    from export import run
    from export.checkpoint import open_checkpoint
    from export.space import SLACK, expected_bytes

    checkpoint = open_checkpoint(tiny_checkpoint)
    weights = expected_bytes(checkpoint, "transformer", "fp32") - SLACK
    assert weights > 0 and expected_bytes(checkpoint, "transformer", "bf16") - SLACK == weights // 2
    monkeypatch.setattr("common.storage.free_bytes", lambda path: 10 * 2**20)  # a disk with 10 MiB free
    with pytest.raises(
        StorageError,
        match=r"not enough space for the text_encoder graph in .*out: about 64.\d MiB needed, 10.0 MiB free",
    ):
        # A full export, so at 128 tokens: export refuses one at a length the tiny chat template (111) fills.
        run.export_artifacts(model=str(tiny_checkpoint), out=tmp_path / "out", shapes=ROOMY, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def _read_only_prefix(folder: Path) -> tuple[str, ...]:
    """A command prefix under which `folder` is read-only for the command (root ignores permission bits)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return ()
    if shutil.which("unshare") is None:
        pytest.skip("root ignores permission bits and unshare(1) is missing for a read-only bind mount")
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    prefix = ("unshare", "-m", "sh", "-c", script, "sh", str(folder))
    probe = subprocess.run([*prefix, "touch", str(folder / ".probe")], capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot make a read-only bind mount here (unshare -m: {probe.stderr.strip()[:80]})")
    return prefix


def test_read_only_artifacts_still_verify_and_generate_and_read_only_out_is_one_line(artifacts, tmp_path):
    deployed = _copy(artifacts, tmp_path / "deployed")
    (deployed / STAMP_NAME).unlink()
    prefix = _read_only_prefix(deployed)
    result = _generate(deployed, tmp_path / "images", prefix=prefix)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "images").glob("*.png"))) == 1 and not (deployed / STAMP_NAME).exists()
    refused = _generate(artifacts, deployed / "images", prefix=prefix)
    _error_line(refused, 2, str(deployed / "images"), "writable")


# --- interrupts --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_export_removes_staging(tiny_checkpoint, tmp_path, signum):
    out = tmp_path / "out"
    export = _popen("-m", "export", "--model", str(tiny_checkpoint), "--out", str(out), *EXPORT_FLAGS)
    _wait_for(lambda: _staging(tmp_path, "out"), export, "the export's staging folder")
    time.sleep(1.0)  # into the tracing (3 s or more), where an exception raised from the handler once crashed it
    export.send_signal(signum)
    result = _finish(export)
    _error_line(result, 128 + signum, f"interrupted ({signal.Signals(signum).name})")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_generate_keeps_finished_images(artifacts, tmp_path):
    images = tmp_path / "images"
    generate = _popen(
        "-m", "runtime.generate", "--artifacts", str(artifacts), "--prompt", "a red fox", "--steps", "60",
        "--num-images", "3", "--out", str(images),
    )  # fmt: skip
    _wait_for(lambda: list(images.glob("*.json")), generate, "the first image")
    generate.send_signal(signal.SIGINT)  # during the second image's denoising
    result = _finish(generate)
    _error_line(result, 130, "interrupted (SIGINT)")
    assert sorted(p.name for p in images.iterdir()) == ["000-00-seed0.json", "000-00-seed0.png"]
