"""What tests share besides fixtures: the repo root, small shapes, running a command line, reading its error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Small shapes keep the suite fast; the 1024x1024 / 512-token defaults are exercised by `make demo`.
SMALL = {"height": 256, "width": 256, "max_sequence_length": 128}
# The (height, width) conftest's resolutions_tiny exports (--resolutions), the default first.
RESOLUTIONS = ((128, 128), (96, 160), (160, 96))


# The project's command lines a test may run in its own process (`run_cli`): each is `main` of the module,
# called through `common.cli.run_cli` as its console script and `python -m` call it. A subprocess would pay
# the ~4 s import of torch, diffusers and onnxruntime again per call (74 calls in the suite); the process
# itself (startup, import errors, what reaches stderr) is tested per command in tests/test_cli_errors.py
# and by the wheel smoke test. `deploy.serve` always gets a process: it owns tritonserver and signals.
IN_PROCESS = {
    "export": "export.__main__",
    "runtime.generate": "runtime.generate",
    "runtime.check": "runtime.check",
    "runtime.verify": "runtime.verify",
    "engines.build": "engines.build",
    "engines.check": "engines.check",
    "deploy.triton": "deploy.triton",
    "deploy.client": "deploy.client",
    "flux2_tiny": "flux2_tiny.__main__",
}


def run_cli(*args: str, cwd: Path = REPO, process: bool = False) -> subprocess.CompletedProcess:
    """`python ARGS`: in this process for the commands of IN_PROCESS (unless `process`), else in a new one."""
    if not process and cwd == REPO and len(args) > 1 and args[0] == "-m" and args[1] in IN_PROCESS:
        return _in_process(IN_PROCESS[args[1]], list(args[2:]), list(args))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _in_process(module: str, argv: list[str], args: list[str]) -> subprocess.CompletedProcess:
    import contextlib
    import importlib
    import io

    from common.cli import run_cli as run_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_main(importlib.import_module(module).main, argv)
        except SystemExit as exc:  # argparse's usage errors, as the process would exit
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess([sys.executable, *args], code, out.getvalue(), err.getvalue())


VARIANT = (
    "text_hidden_size=48", "text_num_layers=5", "text_num_heads=6", "text_num_kv_heads=3", "text_out_layers=1,3,5",
    "num_layers=1", "num_single_layers=3", "num_attention_heads=3", "attention_head_dim=24", "axes_dims_rope=6,6,6,6",
    "latent_channels=4", "vae_block_out_channels=8,16,16", "seed=11",
)  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """A user mistake: exit 2, exactly one line on stderr, no traceback, naming what matters."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# Mistral's real Tekken vocabulary ships inside mistral-common's wheel (mistral_common/data/). The
# wheel is fetched with pip (no install: its numpy<2.4 pin conflicts with this environment) and the
# one file taken out of it, once per cache folder.
MISTRAL_COMMON_WHEEL = "mistral-common==1.13.1"
TEKKEN_MEMBER = "mistral_common/data/tekken_240911.json"


def tekken_vocab(cache: Path) -> Path | None:
    """The real tekken_240911.json under `cache`, or None where pip cannot fetch the wheel."""
    import zipfile

    target = cache / "tekken" / Path(TEKKEN_MEMBER).name
    if target.is_file():
        return target
    wheels = cache / "tekken" / "wheel"
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), MISTRAL_COMMON_WHEEL],
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = sorted(wheels.glob("mistral_common-*.whl"))
    if fetched.returncode != 0 or not found:
        return None
    with zipfile.ZipFile(found[0]) as wheel:
        partial = target.with_suffix(".part")
        partial.write_bytes(wheel.read(TEKKEN_MEMBER))
        partial.rename(target)
    return target


def triton_env():
    """The Triton env deploy.serve uses (`$FLUX2_TRT_TRITON_ENV`, else .venv-triton); the test skips without one."""
    from deploy.stub_env import default_env, read_record

    env = default_env()
    if read_record(env) is None:
        pytest.skip(f"no Triton env in {env}: run `make triton-env` (make test builds it)")
    return env


def ask_triton(url, model="flux2", **values):
    """(HTTP status, images, sidecars or error message) for one request; values None are left out."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    inputs = []
    for name, array in values.items():
        if array is None:
            continue
        tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    with httpclient.InferenceServerClient(url, network_timeout=300, connection_timeout=300) as client:
        try:
            outputs = [httpclient.InferRequestedOutput(name, binary_data=True) for name in ("image", "sidecar")]
            result = client.infer(model, inputs, outputs=outputs)
        except InferenceServerException as exc:
            return int(exc.status() or 0), None, exc.message()
    sidecars = [json.loads(text) for text in result.as_numpy("sidecar")[0]]
    return 200, result.as_numpy("image")[0], sidecars


def diffusers_dev_ids(tokenizer_folder, prompts, max_length):
    """What Flux2Pipeline._get_mistral_3_small_prompt_embeds hands the text encoder (its exact call)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    from common.reference_pipeline import load_reference_tokenizer

    reference = load_reference_tokenizer(tokenizer_folder)
    return reference.apply_chat_template(
        format_input(prompts, SYSTEM_MESSAGE),
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
        padding="max_length",
        truncation=True,
        max_length=max_length,
    )


# -- typed manifests for tests that write their own artifacts (a few hand-made graphs) ------------------

TINY_GEOMETRY = {
    "pipeline_class": "Flux2Pipeline", "text_hidden_size": 32, "text_out_layers": [1, 2, 3], "text_num_layers": 4,
    "in_channels": 16, "out_channels": 16, "joint_attention_dim": 96, "guidance_embeds": True, "latent_channels": 4,
    "vae_scale_factor": 8,
}  # fmt: skip


def component_record(name: str, sha256: dict, inputs, outputs, precision: str = "fp32"):
    """A manifest record for a hand-made graph `name`.onnx; inputs/outputs are TensorSpecs."""
    from common.manifest import ComponentRecord

    return ComponentRecord(
        file=f"{name}.onnx", files=tuple(sha256), sha256=dict(sha256), bytes={n: 0 for n in sha256}, key=name * 2,
        precision=precision, opset=20, nodes=1, inputs=tuple(inputs), outputs=tuple(outputs),
    )  # fmt: skip


def artifacts_manifest(components: dict, precision: str = "fp32", folder: Path | None = None):
    """An `ArtifactsManifest` of `components` (name -> ComponentRecord), written to `folder` when given."""
    from common.atomic import atomic_write_json
    from common.manifest import MANIFEST_NAME, ArtifactsManifest, Source, TokenizerRecord
    from common.specs import Geometry, Shapes

    manifest = ArtifactsManifest(
        created="", precision=precision, source=Source("/nowhere", "test", "0" * 64, "0" * 64),
        geometry=Geometry.from_json(TINY_GEOMETRY), shapes=Shapes(height=128, width=128, max_sequence_length=8),
        versions={}, tokenizer=TokenizerRecord("tokenizer", {}), scheduler_config="scheduler_config.json",
        components=dict(components),
    )  # fmt: skip
    if folder is not None:
        atomic_write_json(Path(folder) / MANIFEST_NAME, manifest.to_json())
    return manifest


def rtx_copy(artifacts: Path, tmp_path: Path) -> Path:
    """A copy of a session fixture's artifacts to build TensorRT-RTX engines into; skips where it is missing."""
    import shutil

    from common.tensorrt_env import module_status

    available, reason = module_status("rtx")
    if not available:
        pytest.skip(f"needs tensorrt_rtx (the dev extra installs it): {reason}")
    folder = tmp_path / "artifacts"
    shutil.copytree(artifacts, folder)
    return folder
