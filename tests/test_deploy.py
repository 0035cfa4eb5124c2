"""deploy/ without a server: request rules, the generated repository, the model's answers, the manifests."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import types
import urllib.request
from pathlib import Path

import pytest

from tests.support import REPO, assert_one_line_error, run_cli

# --- request rules (deploy/request.py) --------------------------------------------------------


def test_defaults_are_runtime_generate_defaults():
    from deploy.request import parse_request
    from runtime.generate import DEFAULT_GUIDANCE, DEFAULT_STEPS

    request = parse_request({"prompt": b"a fox"})
    assert (request.prompt, request.seed, request.steps, request.guidance, request.num_images) == (
        "a fox", 0, DEFAULT_STEPS, DEFAULT_GUIDANCE, 1,
    )  # fmt: skip


@pytest.mark.parametrize(
    "values, reason",
    [
        ({}, "missing input 'prompt'"),
        ({"prompt": b"\xff\xfe"}, "prompt is not valid UTF-8"),
        ({"prompt": b"x", "steps": 0}, "steps 0 is outside 1..100"),
        ({"prompt": b"x", "steps": 101}, "steps 101 is outside 1..100"),
        ({"prompt": b"x", "guidance": math.nan}, "guidance nan must be a finite number >= 0"),
        ({"prompt": b"x", "guidance": math.inf}, "guidance inf must be a finite number >= 0"),
        ({"prompt": b"x", "guidance": -0.5}, "guidance -0.5 must be a finite number >= 0"),
        ({"prompt": b"x", "seed": -1}, "seed -1 must be in [0, 2**63)"),
        ({"prompt": b"x", "num_images": 5}, "num_images 5 is outside 1..4"),
        # What a JSON client can put in a field where the model parses it: text, NaN, an overflow, a fraction.
        ({"prompt": b"x", "guidance": "nan"}, "guidance nan must be a finite number >= 0"),
        ({"prompt": b"x", "guidance": "1e999"}, "guidance inf must be a finite number >= 0"),
        ({"prompt": b"x", "guidance": b"four"}, "guidance 'four' is not a number"),
        ({"prompt": b"x", "seed": 2**63}, "seed 9223372036854775808 must be in [0, 2**63)"),
        ({"prompt": b"x", "seed": "2**63"}, "seed '2**63' is not an integer"),
        ({"prompt": b"x", "seed": math.nan}, "seed nan is not an integer"),
        ({"prompt": b"x", "steps": math.inf}, "steps inf is not an integer"),
        ({"prompt": b"x", "steps": 2.5}, "steps 2.5 is not an integer"),
        ({"prompt": b"x", "num_images": [1]}, "num_images [1] is not an integer"),
    ],
)
def test_bad_values_name_the_value_and_the_range(values, reason):
    from deploy.request import BadRequest, parse_request

    with pytest.raises(BadRequest, match=None) as caught:
        parse_request(values)
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_cache_threshold_is_bounded_and_needs_the_step_cache():
    from deploy.request import BadRequest, parse_request

    assert parse_request({"prompt": "a"}).cache_threshold == 0.0
    assert parse_request({"prompt": "a"}, cache_default=0.3).cache_threshold == 0.3  # the model's --cache-threshold
    assert parse_request({"prompt": "a", "cache_threshold": 0.6}, cache_default=0.0).cache_threshold == 0.6
    assert parse_request({"prompt": "a", "cache_threshold": 0.0}).cache_threshold == 0.0  # 0 is always fine
    for bad in (-0.1, float("nan"), float("inf"), 10.5):
        with pytest.raises(BadRequest, match=r"^cache_threshold .* must be a finite number in 0\.\.10 "):
            parse_request({"prompt": "a", "cache_threshold": bad}, cache_default=0.0)
    with pytest.raises(BadRequest, match="^cache_threshold: this model cannot run the step cache .*--step-cache"):
        parse_request({"prompt": "a", "cache_threshold": 0.5})


def test_loras_read_names_and_scales():
    from deploy.request import BadRequest, parse_request

    def loras(text):
        return parse_request({"prompt": b"x", "loras": text}).loras

    assert parse_request({"prompt": b"x"}).loras == () and loras(b"") == () and loras(b" ") == ()
    assert loras(b"peft:0.7, kohya") == (("peft", 0.7), ("kohya", 1.0))
    assert loras("style:-0.5") == (("style", -0.5),)
    for text, reason in (
        (b"peft:nan", "loras 'peft:nan': scale nan is not a finite number; send NAME or NAME:SCALE"),
        (b"peft:1e999", "scale inf is not a finite number"),
        (b"peft:strong", "loras 'peft:strong': scale 'strong' is not a number"),
        (b"peft,,kohya", "has an empty LoRA name"),
        (b":0.5", "has an empty LoRA name"),
        (b"peft:0.5,peft:1", "names 'peft' twice"),
        (b"\xff", "loras is not valid UTF-8"),
    ):
        with pytest.raises(BadRequest) as caught:
            loras(text)
        assert reason in str(caught.value) and "\n" not in str(caught.value), (text, str(caught.value))


def test_client_sends_loras_as_the_model_reads_them():
    import tritonclient.http as httpclient

    from common.errors import UsageError
    from deploy.client import main, request_inputs
    from deploy.request import GenerationRequest

    (loras,) = [
        i for i in request_inputs(httpclient, GenerationRequest("a", loras=(("peft", 0.7),))) if i.name() == "loras"
    ]
    assert loras.datatype() == "BYTES" and loras.shape() == [1, 1]
    assert not [i for i in request_inputs(httpclient, GenerationRequest("a")) if i.name() == "loras"]
    with pytest.raises(UsageError, match=r"^--lora: loras 'peft:nan': scale nan is not a finite number"):
        main(["--url", "127.0.0.1:1", "--prompt", "a", "--lora", "kohya", "--lora", "peft:nan"])


SIZES = ((128, 128), (96, 160), (160, 96))  # (height, width), the default first
ALLOWED = "this model draws 128x128, 96x160, 160x96 (height x width); send one of them, or neither for 128x128"


def test_height_and_width_pick_one_of_the_exported_sizes():
    import numpy as np

    from deploy.request import BadRequest, parse_request

    def size(**values):
        return parse_request({"prompt": "a fox", **values}, sizes=SIZES).size

    assert size() == (128, 128) and size(height=96, width=160) == (96, 160)
    assert size(height=np.int32(160), width=np.int32(96)) == (160, 96)
    assert parse_request({"prompt": "a fox", "height": 64}).size is None  # without sizes: left unread
    for values, reason in (
        ({"height": 64, "width": 64}, "height 64 width 64 (64x64) was not exported; "),
        ({"height": 160, "width": 160}, "height 160 width 160 (160x160) was not exported; "),
        ({"height": 96}, "height 96 without width: send both; "),
        ({"width": 160}, "width 160 without height: send both; "),
        ({"height": 96.5, "width": 160}, "height 96.5 is not an integer"),
    ):
        with pytest.raises(BadRequest) as caught:
            size(**values)
        message = str(caught.value)
        assert message.startswith(reason) and "\n" not in message, message
        assert ALLOWED in message or "integer" in reason, message


def test_client_sends_height_and_width_only_when_asked():
    import tritonclient.http as httpclient

    from deploy.client import main, request_inputs
    from deploy.request import GenerationRequest

    sent = {i.name(): i for i in request_inputs(httpclient, GenerationRequest("a", size=(96, 160)))}
    assert [(sent[n].datatype(), sent[n].shape()) for n in ("height", "width")] == [("INT32", [1, 1])] * 2
    assert not {"height", "width"} & {i.name() for i in request_inputs(httpclient, GenerationRequest("a"))}
    with pytest.raises(SystemExit) as caught:
        main(["--url", "127.0.0.1:1", "--prompt", "a", "--height", "96"])
    assert caught.value.code == 2


def test_numbers_from_text_and_numpy_scalars_are_taken():
    import numpy as np

    from deploy.request import parse_request

    request = parse_request({"prompt": b"x", "seed": "7", "steps": np.int32(4), "guidance": "2.5"})
    assert (request.seed, request.steps, request.guidance) == (7, 4, 2.5)
    assert parse_request({"prompt": b"x", "seed": np.int64(2**63 - 1), "steps": 3.0}).steps == 3


def test_a_prompt_past_the_byte_limit_is_refused_before_tokenizing():
    import time

    from deploy.request import DEFAULT_MAX_PROMPT_BYTES, BadRequest, parse_request

    def never(text):
        raise AssertionError("the tokenizer saw a prompt past the byte limit")

    assert DEFAULT_MAX_PROMPT_BYTES == 65536
    started = time.perf_counter()
    with pytest.raises(BadRequest) as caught:
        parse_request({"prompt": b"fox " * 1_250_000}, prompt_length=never, max_tokens=512)  # 5 MB
    assert time.perf_counter() - started < 0.5  # 5.6 s when the tokenizer counted it first
    assert str(caught.value).startswith("prompt is 5000000 bytes, past this model's limit of 65536 bytes")
    assert "--max-prompt-bytes" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(BadRequest, match="negative_prompt is 11 bytes, past this model's limit of 10 bytes"):
        parse_request({"prompt": b"x", "negative_prompt": b"a" * 11}, max_prompt_bytes=10)
    # The limit counts UTF-8 bytes, not characters: 4 x 3 bytes.
    with pytest.raises(BadRequest, match="prompt is 12 bytes"):
        parse_request({"prompt": "\u96ea" * 4}, max_prompt_bytes=10)
    assert parse_request({"prompt": b"a" * 10, "negative_prompt": b"b" * 10}, max_prompt_bytes=10).prompt == "a" * 10


def test_a_prompt_the_graphs_would_cut_is_refused_with_its_length():
    from deploy.request import BadRequest, parse_request

    count = lambda text: 100 + len(text.split())  # noqa: E731 -- a stand-in tokenizer: 100 template tokens
    assert parse_request({"prompt": b"one two"}, prompt_length=count, max_tokens=102).prompt == "one two"
    with pytest.raises(BadRequest, match="prompt is 103 tokens once formatted, past the 102"):
        parse_request({"prompt": b"one two three"}, prompt_length=count, max_tokens=102)
    with pytest.raises(BadRequest, match="negative_prompt is 104 tokens"):
        parse_request({"prompt": b"a", "negative_prompt": b"a b c d"}, prompt_length=count, max_tokens=102)


def test_reference_bytes_are_prepared_as_runtime_generate_prepares_the_file(tmp_path):
    """The server's decode of a file's bytes equals runtime.generate's load of the file, fitting included."""
    import numpy as np
    from PIL import Image

    from deploy.request import BadRequest, decode_references
    from runtime.reference_images import load_references

    path = tmp_path / "ref.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)).save(path)
    notes = []
    served = decode_references([path.read_bytes()], count=1, size=(32, 32), multiple_of=16, log=notes.append)
    expected, _ = load_references([path], count=1, size=(32, 32), multiple_of=16)
    assert served.shape == (1, 3, 32, 32) and np.array_equal(served, expected)
    assert notes and "reference_images[0] is 40x24 (HxW); resized and center-cropped" in notes[0]
    for blobs, reason in (
        (None, "missing input 'reference_images'; this model was exported with --reference-images 1"),
        ([b"a", b"b"], "2 reference image(s) sent, but this model takes exactly 1"),
        ([b"not an image"], "reference_images[0] is not an image PIL can read; send an encoded image file"),
        ([path.read_bytes()[:200]], "reference_images[0] is unreadable ("),  # a truncated file
    ):
        with pytest.raises(BadRequest) as caught:
            decode_references(blobs, count=1, size=(32, 32), multiple_of=16)
        assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_untruncated_length_counts_what_token_ids_cuts(export_tiny):
    from common.tokenizer import PromptTokenizer

    tokenizer = PromptTokenizer(export_tiny("fp32") / "tokenizer", 128, pipeline_class="Flux2Pipeline")
    short, long = "a fox", "a fox in the snow " * 20
    assert tokenizer.untruncated_length(short) == len(tokenizer.token_ids(short)) < 128
    assert tokenizer.untruncated_length(long) > 128 == len(tokenizer.token_ids(long))


# --- the runtime's cancellation hook ------------------------------------------------------------


def test_cancelled_callback_stops_between_denoising_steps(export_tiny):
    from runtime.artifacts import open_artifacts
    from runtime.backends.ort import OrtBackend
    from runtime.pipeline import Flux2Runtime, GenerationCancelled, Sampling

    artifacts = open_artifacts(export_tiny("fp32"))
    backend = OrtBackend(artifacts.folder, artifacts.manifest)
    calls = []
    run = backend.run
    backend.run = lambda component, feeds: calls.append(component) or run(component, feeds)
    asked = []
    runtime = Flux2Runtime(artifacts, backend)
    with pytest.raises(GenerationCancelled, match="before denoising step 3 of 5"):
        list(runtime.generate(Sampling("a fox", seed=0, steps=5, guidance=4.0), progress=False,
                              cancelled=lambda: asked.append(1) or len(asked) > 2))  # fmt: skip
    assert calls.count("transformer") == 2 and "vae" not in calls


# --- the model's answers (deploy/model.py against a stand-in for Triton's pb_utils) -----------------


class _TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message, code=1):
        self.message, self.code = message, code


def _fake_pb_utils():
    module = types.ModuleType("triton_python_backend_utils")
    module.TritonError = _TritonError
    module.InferenceResponse = lambda output_tensors=None, error=None: types.SimpleNamespace(
        outputs=output_tensors, error=error
    )
    module.Tensor = lambda name, array: (name, array)
    module.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    module.Logger = types.SimpleNamespace(log_info=lambda m: None, log_error=lambda m: None)
    module.TritonModelException = type("TritonModelException", (Exception,), {})
    return module


class _Input:
    def __init__(self, value):
        import numpy as np

        self.array = np.array([[value]], dtype=np.object_ if isinstance(value, bytes) else None)

    def as_numpy(self):
        return self.array


@pytest.fixture
def model(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    import importlib

    import deploy.model

    module = importlib.reload(deploy.model)
    instance = module.TritonPythonModel()
    instance.max_images = 4
    instance.max_prompt_bytes = 16
    instance.artifacts = types.SimpleNamespace(
        shapes=types.SimpleNamespace(max_sequence_length=128, reference_images=0, sizes=((128, 128),))
    )
    instance.logger = types.SimpleNamespace(log_info=lambda m: None, log_error=lambda m: None)
    return instance


def _request(**values):
    return types.SimpleNamespace(
        tensors={k: _Input(v) for k, v in values.items()}, is_cancelled=lambda: False, request_id=lambda: "7"
    )


def _use(model, runtime):
    """`runtime` as the fake model's one size (the model draws a request with `model.runtimes[size]`)."""
    runtime.artifacts = model.artifacts
    model.runtimes = {(128, 128): runtime}
    return runtime


def _runtime_raising(exc):
    def generate(*args, **kwargs):
        raise exc
        yield

    return types.SimpleNamespace(generate=generate, tokenizer=types.SimpleNamespace(untruncated_length=len), loras=())


def test_model_answers_a_bad_request_with_invalid_arg(model):
    _use(model, _runtime_raising(AssertionError("not reached")))
    answer = model._answer(_request(prompt=b"a fox", steps=0))
    assert answer.error.code == _TritonError.INVALID_ARG and "steps 0" in answer.error.message


def test_model_refuses_a_prompt_past_its_byte_limit_before_the_tokenizer(model):
    _use(model, _runtime_raising(AssertionError("not reached")))
    model.runtimes[(128, 128)].tokenizer.untruncated_length = _runtime_raising(AssertionError("tokenized"))
    answer = model._answer(_request(prompt=b"x" * 17))
    assert answer.error.code == _TritonError.INVALID_ARG
    assert answer.error.message.startswith("prompt is 17 bytes, past this model's limit of 16 bytes")


def test_model_without_a_lora_dir_answers_loras_with_invalid_arg(model):
    _use(model, _runtime_raising(AssertionError("not reached")))
    for rank, reason in ((0, "artifacts have no LoRA slots (exported without --lora-rank)"), (8, "without --lora-dir")):
        model.artifacts.shapes.lora_rank = rank
        answer = model._answer(_request(prompt=b"a fox", loras=b"style:0.8"))
        assert answer.error.code == _TritonError.INVALID_ARG and reason in answer.error.message, answer.error.message
    assert model._answer(_request(prompt=b"a fox", loras=b"")).error.code == _TritonError.INTERNAL  # none: drawn


def test_each_request_of_a_batch_is_drawn_by_its_own_sizes_runtime(model, monkeypatch):
    """execute draws a batch one request after another; each goes to the runtime of the size it asked for."""
    drawn = []

    def runtime_at(size):
        def generate(sampling, **kwargs):
            drawn.append((sampling.seed, size))
            raise RuntimeError("stop here")  # answered INTERNAL: enough to see which runtime drew it
            yield

        return types.SimpleNamespace(generate=generate, tokenizer=types.SimpleNamespace(untruncated_length=len),
                                     loras=(), artifacts=model.artifacts)  # fmt: skip

    model.artifacts.shapes.sizes = SIZES
    model.runtimes = {size: runtime_at(size) for size in SIZES}
    model.timeout_us = 0
    monkeypatch.setattr(
        sys.modules["triton_python_backend_utils"], "TRITONSERVER_RESPONSE_COMPLETE_FINAL", 1, raising=False
    )
    answers = []
    sender = types.SimpleNamespace(send=lambda response, flags: answers.append(response))
    asked = [{}, {"height": 160, "width": 96}, {"height": 96, "width": 160}, {"height": 64, "width": 64}, {}]
    requests = [_request(prompt=b"a fox", seed=seed, **size) for seed, size in enumerate(asked)]
    for request in requests:
        request.get_response_sender, request.timeout = (lambda: sender), (lambda: 0)
    assert model.execute(requests) == [None] * 5
    assert drawn == [(0, (128, 128)), (1, (160, 96)), (2, (96, 160)), (4, (128, 128))]
    codes = [answer.error.code for answer in answers]
    assert codes == [_TritonError.INTERNAL] * 3 + [_TritonError.INVALID_ARG, _TritonError.INTERNAL]
    assert ALLOWED in answers[3].error.message


def test_a_further_sizes_backend_shares_the_first_sizes_text_encoder():
    from deploy.sizes import SizedBackend

    calls = []

    def backend(name):
        run = lambda component, feeds: calls.append((name, component)) or {}  # noqa: E731
        return types.SimpleNamespace(name="ort-cpu", run=run, close=lambda: calls.append((name, "close")))

    sized = SizedBackend(backend("96x160"), backend("128x128"))
    for component in ("text_encoder", "transformer", "vae", "vae_encoder"):
        sized.run(component, {})
    sized.close()
    assert calls == [("128x128", "text_encoder"), ("96x160", "transformer"), ("96x160", "vae"),
                     ("128x128", "vae_encoder"), ("96x160", "close")]  # fmt: skip


def test_model_answers_a_generation_failure_with_internal_for_that_request(model):
    _use(model, _runtime_raising(RuntimeError("ORT: out of memory\nat node 7")))
    answer = model._answer(_request(prompt=b"a fox"))
    assert answer.error.code == _TritonError.INTERNAL  # HTTP 500
    assert answer.error.message == "generation failed: RuntimeError: ORT: out of memory at node 7"


def test_model_answers_a_cancelled_request_with_cancelled(model):
    from runtime.pipeline import GenerationCancelled

    _use(model, _runtime_raising(GenerationCancelled("cancelled before denoising step 2 of 50")))
    answer = model._answer(_request(prompt=b"a fox"))
    assert answer.error.code == _TritonError.CANCELLED


# --- the repository generator and the command lines' errors ------------------------------------------


def test_repository_holds_config_and_model(export_tiny, tmp_path):
    from deploy.triton import ModelSettings, write_repository

    artifacts = export_tiny("fp32")
    settings = ModelSettings(name="fox", instances=2, max_queue=3, timeout_s=1.5)
    target = write_repository(artifacts=artifacts, repository=tmp_path / "repo", settings=settings)
    config = (target / "config.pbtxt").read_text()
    assert 'name: "fox"' in config and "max_batch_size: 3" in config
    assert "dims: [ -1, 256, 256, 3 ]" in config  # the artifacts' image shape
    assert "count: 2 kind: KIND_CPU" in config  # no engines: CPU instances
    # --max-queue 3: Triton's queue holds 3, and hands the instance up to 3 at once
    assert "max_queue_size: 3" in config and "max_queue_delay_microseconds: 10000" in config
    assert "default_timeout_microseconds: 1500000" in config
    assert f'string_value: "{artifacts.resolve()}"' in config
    assert (target / "1" / "model.py").read_bytes() == (REPO / "deploy" / "model.py").read_bytes()
    # Written again with the default settings: it replaces the first.
    again = write_repository(artifacts=artifacts, repository=tmp_path / "repo", settings=ModelSettings(name="fox"))
    assert "count: 1 kind: KIND_CPU" in (again / "config.pbtxt").read_text()
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["fox"]  # nothing partial left behind


def test_instances_go_on_the_gpu_where_engines_run(tmp_path):
    from deploy.triton import instance_kind

    (tmp_path / "engines" / "rtx").mkdir(parents=True)
    assert instance_kind("auto", "auto", tmp_path) == "KIND_CPU"
    (tmp_path / "engines" / "rtx" / "manifest.json").write_text("{}")
    assert instance_kind("auto", "auto", tmp_path) == "KIND_GPU"
    assert instance_kind("auto", "trt", tmp_path) == "KIND_GPU"
    assert instance_kind("auto", "ort", tmp_path) == "KIND_CPU"
    assert instance_kind("gpu", "ort", tmp_path) == "KIND_GPU"


def test_config_names_the_tensorrt_and_gpu_the_engines_need(export_tiny, tmp_path):
    """A GPU repository says which TensorRT the serving image must carry (from the engine manifest)."""
    import shutil

    from common.engine_manifest import EngineManifest, EngineRecord, write_engine_manifest
    from common.manifest import read_manifest
    from common.specs import Shapes
    from common.tensorrt_env import Platform
    from deploy.triton import ModelSettings, engines_platform, render_config

    artifacts = tmp_path / "artifacts"
    shutil.copytree(export_tiny("fp32"), artifacts)
    platform = Platform("tensorrt", "10.13.3", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    engines = {
        name: EngineRecord(plan=f"{name}.plan", onnx=c.file, onnx_sha256=c.sha256, platform=platform, flags={},
                           inputs=c.inputs, outputs=c.outputs, key="k", plan_bytes=1, plan_sha256="", build_seconds=0,
                           built="")
        for name, c in read_manifest(artifacts).components.items()
    }  # fmt: skip
    (artifacts / "engines" / "tensorrt").mkdir(parents=True)
    write_engine_manifest(artifacts, EngineManifest("tensorrt", "fp32", engines))
    assert engines_platform(artifacts) == platform
    settings = ModelSettings(name="m", backend="trt", instances=1, max_queue=1, timeout_s=1, max_images=1)
    config = render_config(settings, artifacts=artifacts, shapes=Shapes(batch_size=1, height=16, width=16),
                           kind="KIND_GPU", platform=platform)  # fmt: skip
    assert '"engines_tensorrt" value: { string_value: "10.13.3" }' in config
    assert "kind: KIND_GPU" in config


def test_artifacts_at_several_sizes_answer_images_of_any_height_and_width(tmp_path):
    from common.specs import Shapes
    from deploy.triton import ModelSettings, render_config

    settings = ModelSettings(name="m", backend="ort", instances=1, max_queue=1, timeout_s=1, max_images=1)
    one = render_config(settings, artifacts=tmp_path, shapes=Shapes(height=128, width=128), kind="KIND_CPU")
    several = render_config(settings, artifacts=tmp_path, shapes=Shapes(height=128, width=128, resolutions=SIZES),
                            kind="KIND_CPU")  # fmt: skip
    for config in (one, several):
        assert '{ name: "height" data_type: TYPE_INT32 dims: [ 1 ] optional: true },' in config
        assert '{ name: "width" data_type: TYPE_INT32 dims: [ 1 ] optional: true }' in config
    assert "dims: [ -1, 128, 128, 3 ]" in one and "dims: [ -1, -1, -1, 3 ]" in several


def test_only_editing_artifacts_declare_reference_images(tmp_path):
    from common.specs import Shapes
    from deploy.triton import ModelSettings, render_config

    settings = ModelSettings(name="m", backend="ort", instances=1, max_queue=1, timeout_s=1, max_images=1)
    plain = render_config(
        settings, artifacts=tmp_path, shapes=Shapes(batch_size=1, height=16, width=16), kind="KIND_CPU"
    )
    editing = render_config(
        settings,
        artifacts=tmp_path,
        shapes=Shapes(batch_size=1, height=16, width=16, reference_images=2),
        kind="KIND_CPU",
    )
    assert "reference_images" not in plain
    assert '{ key: "max_prompt_bytes" value: { string_value: "65536" } }' in plain
    added = [line for line in editing.splitlines() if line not in plain.splitlines()]
    assert added == [
        '  { name: "cache_threshold" data_type: TYPE_FP64 dims: [ 1 ] optional: true },',
        "  # 2 encoded image file(s) (PNG, JPEG, ...), as runtime.generate's --image reads them",
        '  { name: "reference_images" data_type: TYPE_STRING dims: [ -1 ] }',
    ]


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--backend", "torch"], ["--backend 'torch' is not one of auto, trt, ort"]),
        (["--backend", "trt"], ["--backend trt needs engines", "engines.build"]),
        (["--instances", "0"], ["--instances 0 must be >= 1"]),
        (["--timeout-s", "0"], ["--timeout-s 0.0 must be > 0"]),
        (["--name", "a/b"], ["--name 'a/b' must be"]),
        (["--max-prompt-bytes", "0"], ["--max-prompt-bytes 0 must be >= 1"]),
        (["--lora-dir", "."], ["--lora-dir .: the artifacts", "have no LoRA slots", "--lora-rank R"]),
    ],
)
def test_generator_errors_are_one_line(export_tiny, tmp_path, extra, needles):
    artifacts = export_tiny("fp32")
    result = run_cli("-m", "deploy.triton", "--artifacts", str(artifacts), "--repository", str(tmp_path / "r"), *extra)
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "r").exists()


def _artifacts_without_room(folder: Path, tiny_checkpoint: Path) -> Path:
    """Hand-made artifacts at max_sequence_length 8 (tests.support's manifest), with the tiny [dev] tokenizer
    (111 template tokens): open_artifacts accepts them, none can serve. Empty graphs, as deploy.triton reads none."""
    import shutil

    from common.manifest import sha256_file
    from common.specs import COMPONENTS, component_specs
    from tests.support import artifacts_manifest, component_record

    shutil.copytree(tiny_checkpoint / "tokenizer", folder / "tokenizer")
    shutil.copy2(tiny_checkpoint / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json")
    shape = artifacts_manifest({})
    specs = component_specs(shape.geometry, shape.shapes)
    records = {}
    for name in COMPONENTS:
        (folder / f"{name}.onnx").write_bytes(b"")
        digest = {f"{name}.onnx": sha256_file(folder / f"{name}.onnx")}
        records[name] = component_record(name, digest, specs[name].inputs, specs[name].outputs)
    artifacts_manifest(records, folder=folder)
    return folder


ROOM_NEEDLES = (
    "(exported with max_sequence_length 8) leaves no room for a prompt",
    "formats to 111 tokens (an empty prompt), filling all 8",
    "re-export them with --max-sequence-length 112 or more",
)


def test_generator_refuses_artifacts_whose_chat_template_fills_their_length(tmp_path, tiny_checkpoint):
    artifacts = _artifacts_without_room(tmp_path / "artifacts", tiny_checkpoint)
    result = run_cli("-m", "deploy.triton", "--artifacts", str(artifacts), "--repository", str(tmp_path / "r"))
    assert_one_line_error(result, f"artifacts {artifacts} ", *ROOM_NEEDLES)
    assert not (tmp_path / "r").exists()


def test_model_never_loads_artifacts_whose_chat_template_fills_their_length(model, tmp_path, tiny_checkpoint):
    """A repository written before deploy.triton refused them: initialize fails with the same reason, so Triton
    never reports the model ready (it fails before the backend loads)."""
    artifacts = _artifacts_without_room(tmp_path / "artifacts", tiny_checkpoint)
    config = {"parameters": {"artifacts": {"string_value": str(artifacts)}, "backend": {"string_value": "ort"}}}
    args = {"model_config": json.dumps(config), "model_name": "fox", "model_version": "1", "model_instance_kind": "CPU"}
    with pytest.raises(sys.modules["triton_python_backend_utils"].TritonModelException) as refused:
        model.initialize(args)
    message = str(refused.value)
    assert message.startswith(f"flux2 model fox: artifacts {artifacts} ") and "\n" not in message
    assert all(needle in message for needle in ROOM_NEEDLES), message


def test_warm_up_goes_through_the_request_rules(model):
    """The warm-up prompt is parsed and counted as a request's: one the model would refuse fails the load."""
    _use(
        model,
        types.SimpleNamespace(
            generate=lambda *a, **k: pytest.fail("drew an image"),
            tokenizer=types.SimpleNamespace(untruncated_length=len),
        ),
    )
    model.artifacts.shapes.max_sequence_length = 0  # any prompt is past it
    with pytest.raises(
        sys.modules["triton_python_backend_utils"].TritonModelException,
        match="warm-up request refused: prompt is 1 tokens",
    ):
        model._warm_up("fox")


def test_generator_on_a_missing_folder_is_one_line(tmp_path):
    result = run_cli("-m", "deploy.triton", "--artifacts", str(tmp_path / "nope"), "--repository", str(tmp_path / "r"))
    assert_one_line_error(result, str(tmp_path / "nope"))


def test_serve_without_a_model_or_a_server_is_one_line(tmp_path, monkeypatch):
    result = run_cli("-m", "deploy.serve", "--repository", str(tmp_path))
    assert_one_line_error(result, "holds no model", "deploy.triton")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text("")
    env_dir = tmp_path / "no-env"
    result = run_cli("-m", "deploy.serve", "--repository", str(tmp_path), "--triton-env", str(env_dir))
    assert_one_line_error(result, "no Triton env in", str(env_dir), "make triton-env")


def test_serve_command_sets_up_the_wheel_stub(tmp_path):
    """LD_LIBRARY_PATH starts with the interpreter's LIBDIR, the env's python3 is first on PATH."""
    from deploy.serve import server_command

    env_dir = tmp_path / "env"
    env_dir.mkdir()
    record = {
        "tritonserver": str(env_dir / "tritonserver"),
        "backend_directory": "/b",
        "library_path": ["/libdir", "/libs"],
        "bin": str(env_dir / "bin"),
    }
    (env_dir / "tritonserver").write_text("")
    (env_dir / "flux2-triton.json").write_text(json.dumps(record))
    (tmp_path / "repo" / "m").mkdir(parents=True)
    (tmp_path / "repo" / "m" / "config.pbtxt").write_text("")
    command, env = server_command(tmp_path / "repo", http_port=1, grpc_port=2, metrics_port=3, triton_env=env_dir)
    assert command[0] == record["tritonserver"] and "--backend-directory=/b" in command
    assert "--http-port=1" in command and "--metrics-port=3" in command
    # Loopback unless asked: tritonserver's own default, 0.0.0.0, would expose every endpoint.
    for endpoint in ("http", "grpc", "metrics"):
        assert f"--{endpoint}-address=127.0.0.1" in command, endpoint
    command, _ = server_command(tmp_path / "repo", host="0.0.0.0", triton_env=env_dir)
    # HTTP and metrics stay on loopback: deploy.serve's counting proxy serves them on the host (http_proxy.py).
    assert [a for a in command if "-address=" in a] == [
        "--http-address=127.0.0.1", "--grpc-address=0.0.0.0", "--metrics-address=127.0.0.1",
    ]  # fmt: skip
    assert env["LD_LIBRARY_PATH"].split(":")[:2] == ["/libdir", "/libs"]
    assert env["PATH"].split(":")[0] == record["bin"]


@pytest.mark.parametrize("host", ["localhost", "1.2.3", "127.0.0.256", "::1", "0.0.0.0:8000", ""])
def test_serve_refuses_a_malformed_host_in_one_line(tmp_path, host):
    result = run_cli("-m", "deploy.serve", "--repository", str(tmp_path), "--host", host)
    assert_one_line_error(result, f"--host {host!r} is not an IPv4 address", "127.0.0.1", "0.0.0.0")


def test_stub_env_puts_numpy_1_first_and_the_project_behind_it(tmp_path):
    """The .pth appends this interpreter's site-packages after the env's own (its numpy 1.x wins)."""
    import sysconfig

    from deploy.stub_env import PTH, _write_pth

    _write_pth(tmp_path, {"purelib": str(tmp_path)})
    lines = (tmp_path / PTH).read_text().splitlines()
    assert lines[0] == f"import sys; sys.path.insert(0, {str(REPO)!r})"  # this checkout, not an editable elsewhere
    assert f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})" in lines


def _fake_triton():
    """A stdlib HTTP server answering as Triton does: 503s with its two messages, a 200, and /metrics."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answers = {
        "/v2/models/m/infer": (503, b'{"error":"Exceeds maximum queue size"}'),
        "/v2/models/m/versions/1/infer": (503, b'{"error":"Request timeout expired"}'),
        "/v2/models/m/ready": (200, b""),
        "/metrics": (200, b'nv_inference_request_success{model="m",version="1"} 3\n'),
    }

    class Triton(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802
            sent = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, body = answers.get(self.path, (200, sent))  # any other path: echo the body
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST  # noqa: N815

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Triton)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def test_proxy_counts_each_503_by_reason_and_passes_answers_on_unchanged():
    """deploy.serve's HTTP port in front of a fake Triton: bodies byte for byte, one count per 503 received."""
    import http.client

    from deploy.http_proxy import REJECTED, CountingProxy, loopback_ports

    triton = _fake_triton()
    port = triton.server_address[1]
    http_port, metrics_port = loopback_ports(2)
    proxy = CountingProxy(host="127.0.0.1", ports=(http_port, metrics_port), triton_ports=(port, port), models=["m"])
    proxy.start()
    try:
        client = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)  # one connection, kept alive

        def ask(method, path, body=None, **options):
            client.request(method, path, body=body, **options)
            answer = client.getresponse()
            return answer.status, answer.read()

        payload = bytes(range(256)) * 1000  # binary, past one 64 KiB read
        assert ask("POST", "/v2/models/m/echo", payload) == (200, payload)
        assert ask("POST", "/v2/models/m/echo", iter([b"ab", b"cd"]), encode_chunked=True) == (200, b"abcd")
        statuses = [ask("POST", "/v2/models/m/infer", b"{}")[0] for _ in range(3)]
        statuses.append(ask("POST", "/v2/models/m/versions/1/infer", b"{}")[0])
        assert statuses == [503, 503, 503, 503] and ask("GET", "/v2/models/m/ready") == (200, b"")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
            metrics = answer.read().decode()
        assert 'nv_inference_request_success{model="m",version="1"} 3' in metrics  # Triton's text, then ours
        assert f'{REJECTED}{{model="m",reason="queue_full"}} 3' in metrics
        assert f'{REJECTED}{{model="m",reason="timeout"}} 1' in metrics
        triton.shutdown()
        triton.server_close()
        assert ask("GET", "/v2/health/ready")[0] == 502  # Triton gone: an answer, not a hang
    finally:
        proxy.close(drain_s=1)


def test_client_without_a_server_is_one_line(tmp_path):
    from deploy.local_server import free_ports

    (port,) = free_ports(1)
    out = tmp_path / "images"
    result = run_cli("-m", "deploy.client", "--url", f"127.0.0.1:{port}", "--prompt", "x", "--out", str(out))
    assert_one_line_error(result, f"127.0.0.1:{port}")
    assert not out.exists()  # made with the first image only


def test_deploy_modules_import_in_the_project_env():
    """The command lines' modules need neither pytriton nor numpy < 2 (the server's env has those)."""
    code = "import deploy.triton, deploy.serve, deploy.client, deploy.stub_env, deploy.local_server, deploy.request"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- production manifests (deploy/k8s) --------------------------------------------------------------


def _documents(path: Path) -> list[dict]:
    import yaml

    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def test_kubernetes_manifests_parse_and_wire_probe_gpu_and_autoscaling():
    folder = REPO / "deploy" / "k8s"
    docs = {doc["kind"]: doc for path in sorted(folder.glob("*.yaml")) for doc in _documents(path)}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "InferenceService"} <= docs.keys()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].rsplit(":", 1)[1] == _triton_release()  # the image built FROM that release
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])  # /dev/shm for the stub
    service_ports = {p["name"] for p in docs["Service"]["spec"]["ports"]}
    assert service_ports == set(ports)
    (metric,) = docs["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "nv_inference_pending_request_count"
    predictor = docs["InferenceService"]["spec"]["predictor"]
    assert predictor["model"]["modelFormat"]["name"] == "triton"
    assert predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] == 1


# The one custom resource: KServe's CRD schema is not among Kubernetes' own, so it is parsed above
# and checked field by field there, not schema-validated.
NOT_SCHEMA_CHECKED = {"kserve.yaml"}


def _kubernetes_validate(*paths: Path):
    import subprocess
    import sys

    validator = Path(sys.executable).with_name("kubernetes-validate")
    return subprocess.run([str(validator), "--strict", *map(str, paths)], capture_output=True, text=True, timeout=120)


def test_kubernetes_manifests_pass_the_api_schemas_strictly(tmp_path):
    """kubernetes-validate --strict: each file against Kubernetes' own schemas, unknown fields refused."""
    files = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
    result = _kubernetes_validate(*files)
    assert result.returncode == 0, result.stdout + result.stderr
    passed = {line.split()[1].rsplit("/", 1)[-1] for line in result.stdout.splitlines() if " passed " in line}
    unchecked = {line.split()[1].rsplit("/", 1)[-1] for line in result.stdout.splitlines() if "find schema" in line}
    assert passed == {f.name for f in files} - NOT_SCHEMA_CHECKED and unchecked == NOT_SCHEMA_CHECKED, result.stdout
    # and it does refuse: the deployment with one misspelt field fails --strict
    broken = tmp_path / "deployment.yaml"
    broken.write_text(
        (REPO / "deploy" / "k8s" / "deployment.yaml").read_text().replace("readinessProbe:", "readinesProbe:", 1)
    )
    assert "readinesProbe" in broken.read_text()
    refused = _kubernetes_validate(broken)
    assert refused.returncode != 0 and "readinesProbe" in refused.stdout + refused.stderr, refused.stdout


def _triton_release() -> str:
    """The NGC Triton release deploy/Dockerfile builds FROM, e.g. 25.01."""
    import re

    (release,) = re.findall(
        r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", (REPO / "deploy" / "Dockerfile").read_text()
    )
    return release


def test_container_release_agrees_across_files():
    """The Dockerfile, the manifests and docs/serving.md name the same NGC release (24.11+: numpy 2 strings)."""
    release = _triton_release()
    assert release >= "24.11"
    k8s = REPO / "deploy" / "k8s"
    files = [k8s / "deployment.yaml", k8s / "kserve.yaml", k8s / "engines-job.yaml", REPO / "docs" / "serving.md"]
    for path in files:
        text = path.read_text()
        assert f"tritonserver:{release}-py3" in text or f"flux2-triton:{release}" in text, path.name
    kserve = _documents(REPO / "deploy" / "k8s" / "kserve.yaml")[0]
    assert kserve["spec"]["predictor"]["model"]["runtimeVersion"] == f"{release}-py3"
