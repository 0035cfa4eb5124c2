"""The real tritonserver (2.51, from the pinned nvidia-pytriton wheel) serving generated repositories.

One server per module holds six models: `flux2` on the tiny fp32 artifacts, `flux2_q1` on the same
artifacts with a queue of one (for 503), two artifacts folders this module exports for itself
(a tiny variant at fp32, and FLUX.2 [klein] base with classifier-free guidance), `lora` on the
session's LoRA-slot artifacts (conftest's lora_tiny) with --lora-dir on conftest's LoRA files, and
`sizes` on the session's three-size artifacts (conftest's resolutions_tiny). The last test stops
the server with SIGTERM while requests are in flight.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.support import SMALL, run_cli
from tests.support import ask_triton as _ask
from tests.support import triton_env as _triton_env

pytestmark = pytest.mark.slow

PROMPT = "a red fox in fresh snow"
STEPS = 2


def _values(
    prompt=PROMPT, *, seed=0, steps=STEPS, guidance=None, num_images=None, negative_prompt=None, loras=None, size=None,
    cache_threshold=None,
):  # fmt: skip
    as_array = {
        "cache_threshold": (cache_threshold, np.float64),
        "height": ((size or (None, None))[0], np.int32),  # (height, width); a side None is left out
        "width": ((size or (None, None))[1], np.int32),
        "prompt": (prompt, np.object_),
        "negative_prompt": (negative_prompt, np.object_),
        "seed": (seed, np.int64),
        "steps": (steps, np.int32),
        "guidance": (guidance, np.float64),
        "num_images": (num_images, np.int32),
        "loras": (loras, np.object_),
    }
    return {
        name: None if value is None else np.array([[value.encode() if dtype is np.object_ else value]], dtype=dtype)
        for name, (value, dtype) in as_array.items()
    }


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def served(tmp_path_factory, export_tiny, variant_artifacts, lora_tiny, lora_files, resolutions_tiny, cached_tiny):
    from common.specs import Shapes
    from deploy.local_server import LocalServer, processes_mentioning
    from deploy.triton import ModelSettings, write_repository
    from export.run import export_artifacts

    env = _triton_env()
    root = tmp_path_factory.mktemp("served")
    tiny = export_tiny("fp32")
    # The variant's checkpoint is exported again here at 128 tokens and a smaller image (no numerics
    # check, test_export_variant.py has it); it was first a workaround for a variant exported at 96
    # tokens, fewer than the tiny [dev] chat template's 111, which export now refuses.
    variant = root / "variant"
    shapes = Shapes(height=128, width=192, max_sequence_length=SMALL["max_sequence_length"])
    export_artifacts(model=str(variant_artifacts.parent / "checkpoint"), out=variant, shapes=shapes,
                     skip_check=True, log=lambda m: None)  # fmt: skip
    klein = root / "klein"
    export_artifacts(model="tiny-klein", out=klein, shapes=Shapes(height=128, width=128, max_sequence_length=64),
                     skip_check=True, log=lambda m: None)  # fmt: skip
    repository = root / "repository"
    for artifacts, settings in (
        (tiny, ModelSettings(name="flux2", backend="ort", max_queue=8)),
        (tiny, ModelSettings(name="flux2_q1", backend="ort", max_queue=1)),
        (variant, ModelSettings(name="variant", backend="ort")),
        (klein, ModelSettings(name="klein", backend="ort")),
        (lora_tiny, ModelSettings(name="lora", backend="ort", lora_dir=lora_files["kohya"].parent)),
        (resolutions_tiny, ModelSettings(name="sizes", backend="ort")),
        (cached_tiny, ModelSettings(name="cached", backend="ort", cache_threshold=CACHED_DEFAULT)),
    ):
        write_repository(artifacts=artifacts, repository=repository, settings=settings)
    server = LocalServer(repository, triton_env=env)
    server.start()
    server.artifacts = {"flux2": tiny, "variant": variant, "klein": klein, "lora": lora_tiny, "sizes": resolutions_tiny}
    server.artifacts["cached"] = cached_tiny
    yield server
    server.stop()
    assert processes_mentioning(str(repository.resolve())) == [], "a server or stub process outlived the test"


def _reference(artifacts, tmp_path, **kwargs):
    """What runtime.generate writes for the same request: (PNG bytes, sidecar) of image 0."""
    from runtime.generate import generate

    out = tmp_path / f"reference-{artifacts.name}"
    paths = generate(artifacts=artifacts, prompts=[kwargs.pop("prompt", PROMPT)], out=out, backend="ort",
                     progress=False, log=lambda m: None, steps=kwargs.pop("steps", STEPS), **kwargs)  # fmt: skip
    return paths[0].read_bytes(), json.loads(paths[0].with_suffix(".json").read_text())


def _png_pixels(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def test_client_writes_the_png_and_sidecar_runtime_generate_writes(served, tmp_path):
    expected_png, expected_sidecar = _reference(served.artifacts["flux2"], tmp_path, seed=3)
    out = tmp_path / "client"
    result = run_cli("-m", "deploy.client", "--url", served.url, "--prompt", PROMPT, "--seed", "3",
                     "--steps", str(STEPS), "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    png = out / "000-00-seed3.png"
    assert png.read_bytes() == expected_png  # byte for byte: the same pixels, encoded by the same writer
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert sidecar.keys() == expected_sidecar.keys()
    drop = ("timings",)
    assert {k: v for k, v in sidecar.items() if k not in drop} == {
        k: v for k, v in expected_sidecar.items() if k not in drop
    }
    assert sidecar["timings"].keys() == expected_sidecar["timings"].keys()


def test_ready_only_after_every_model_drew_its_warm_up_image(served):
    """The fixture returned on /v2/health/ready: by then each model had loaded and drawn its warm-up image."""
    log = served.log()
    for model in ("flux2", "flux2_q1", "variant", "klein", "lora", "sizes"):
        assert re.search(rf"flux2 model {model}: .* on ort-cpu \(fp32\), warm-up image", log), model


def test_client_reports_a_server_error_in_one_line(served, tmp_path):
    result = run_cli("-m", "deploy.client", "--url", served.url, "--prompt", PROMPT, "--steps", "0",
                     "--out", str(tmp_path))  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "HTTP 400" in lines[0] and "steps 0 is outside 1..100" in lines[0], lines[0]


def test_eight_concurrent_requests_all_succeed(served, tmp_path):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda seed: _ask(served.url, **_values(seed=seed)), range(8)))
    assert [status for status, _, _ in answers] == [200] * 8, [a[2] for a in answers if a[0] != 200]
    assert [sidecars[0]["seed"] for _, _, sidecars in answers] == list(range(8))
    expected_png, _ = _reference(served.artifacts["flux2"], tmp_path, seed=5)
    assert np.array_equal(answers[5][1][0], _png_pixels(expected_png))
    assert not np.array_equal(answers[5][1][0], answers[6][1][0])  # each request drew its own seed


def test_eight_concurrent_requests_take_at_most_1_5_x_eight_sequential(served):
    """One instance: a queue must not leave it idle between requests (issue 26: 3.12 s against 0.3 s).

    Measured in the same test, sequential and concurrent alternating three times, so that the load
    of a shared machine lands on both; the median ratio of the three rounds is held to 1.5 x.
    """
    import statistics

    gate = threading.Barrier(8)

    def concurrent(seed):
        gate.wait()  # all eight sent together, as one burst
        return _ask(served.url, **_values(seed=seed, steps=4))[0]

    ratios = []
    for _ in range(3):
        started = time.perf_counter()
        assert [_ask(served.url, **_values(seed=seed, steps=4))[0] for seed in range(8)] == [200] * 8
        sequential_s = time.perf_counter() - started
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(concurrent, range(8))) == [200] * 8
        ratios.append(round((time.perf_counter() - started) / sequential_s, 2))
    assert statistics.median(ratios) <= 1.5, f"8 concurrent / 8 sequential wall time, per round: {ratios}"


BAD_REQUESTS = [
    ("missing prompt", {"prompt": None}, "prompt"),
    ("steps 0", {"steps": 0}, "steps 0 is outside 1..100"),
    ("steps 101", {"steps": 101}, "steps 101 is outside 1..100"),
    ("NaN guidance", {"guidance": math.nan}, "guidance nan must be a finite number >= 0"),
    ("negative guidance", {"guidance": -1.0}, "guidance -1.0 must be a finite number >= 0"),
    ("negative seed", {"seed": -1}, "seed -1 must be in [0, 2**63)"),
    ("no images", {"num_images": 0}, "num_images 0 is outside 1..4"),
    ("prompt too long", {"prompt": "fox " * 200}, "tokens once formatted, past the 128"),
    # Refused on its size before the tokenizer sees it (counting it took 6.5 s here, 0.02-0.1 s now).
    ("5 MB prompt", {"prompt": "fox " * 1_250_000}, "prompt is 5000000 bytes, past this model's limit of 65536"),
]


@pytest.mark.parametrize("case, change, reason", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_is_a_400_with_its_reason_and_serving_goes_on(served, case, change, reason):
    values = _values(**{k: v for k, v in change.items() if k != "prompt"})
    if "prompt" in change:
        values["prompt"] = None if change["prompt"] is None else np.array([[change["prompt"].encode()]], np.object_)
    status, _, message = _ask(served.url, **values)
    assert status == 400, message
    assert reason in message and "\n" not in message, message
    assert _ask(served.url, **_values())[0] == 200


def test_wrong_input_type_is_a_400(served):
    values = _values()
    values["steps"] = np.array([[2.0]], dtype=np.float32)
    status, _, message = _ask(served.url, **values)
    assert status == 400 and "steps" in message and "FP32" in message, message


def test_full_queue_is_refused_with_503_and_each_refusal_is_counted(served):
    """flux2_q1: one request running, one waiting; the rest are refused at once, and counted.

    Triton 2.51 counts none of them (its REJECTED counts queue timeouts only); deploy.serve's HTTP
    port counts each 503 it passes on (deploy/http_proxy.py), on the metrics port Prometheus scrapes.
    """
    slow = _values(steps=100, num_images=4)
    before = served.metrics()
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _ask(served.url, model="flux2_q1", **slow), range(6)))
    after = served.metrics()
    statuses = sorted(status for status, _, _ in answers)
    assert statuses.count(503) >= 1 and set(statuses) <= {200, 503}, [a[2] for a in answers if a[0] != 200]
    assert statuses.count(200) >= 2, statuses
    refused = [message for status, _, message in answers if status == 503]
    assert all("Exceeds maximum queue size" in message for message in refused), refused

    def delta(name, **labels):
        return _metric(after, name, model="flux2_q1", **labels) - _metric(before, name, model="flux2_q1", **labels)

    assert delta("flux2_requests_rejected_total", reason="queue_full") == len(refused), (len(refused), after)
    assert delta("flux2_requests_rejected_total", reason="timeout") == 0
    assert delta("nv_inference_request_failure") == 0  # Triton's own: not one of them (docs/serving.md)


def test_metrics_count_requests_images_and_stage_seconds(served):
    before = served.metrics()
    assert _ask(served.url, **_values(num_images=2))[0] == 200
    # Triton updates its request statistics after the response is on its way: measured once in a
    # full-suite run, the scrape right after the answer still had the old count. Wait for it (bounded).
    deadline = time.monotonic() + 10
    while True:
        after = served.metrics()
        counted = _metric(after, "nv_inference_request_success", model="flux2")
        if counted > _metric(before, "nv_inference_request_success", model="flux2") or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    def delta(name, **labels):
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert delta("nv_inference_request_success", model="flux2") == 1
    assert delta("flux2_images_total", model="flux2") == 2
    for stage in ("text_encoder", "denoise", "vae"):
        assert delta("flux2_stage_seconds_total", model="flux2", stage=stage) > 0, stage


def test_grpc_cancellation_stops_generation_between_steps(served):
    """A gRPC client cancels a 4-image, 100-step request: the model stops between steps, the next request is served."""
    script = f"""
import queue, sys, time
import numpy as np, tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype
values = {{"prompt": np.array([[b"a fox"]], np.object_), "steps": np.array([[100]], np.int32),
          "num_images": np.array([[4]], np.int32)}}
inputs = []
for name, array in values.items():
    tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    inputs.append(tensor)
answers = queue.Queue()
client = grpcclient.InferenceServerClient({served.grpc_url!r})
call = client.async_infer("flux2", inputs, callback=lambda result, error: answers.put(error))
time.sleep(0.5)  # the request is on the server, mid-generation (4 x 100 steps take seconds)
call.cancel()
print(answers.get(timeout=60))
"""
    before = served.metrics()
    from deploy.stub_env import read_record

    python = f"{read_record(_triton_env())['bin']}/python"
    result = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "CANCELLED" in result.stdout, result.stdout + result.stderr
    assert _ask(served.url, **_values())[0] == 200  # queued behind the cancelled one: it has stopped by now
    after = served.metrics()
    drawn = _metric(after, "flux2_images_total", model="flux2") - _metric(before, "flux2_images_total", model="flux2")
    assert drawn - 1 < 4, f"the cancelled request drew all its 4 images ({drawn} counted)"
    assert re.search(r"cancelled before denoising step \d+ of 100", served.log()), "the server saw no cancellation"


def test_variant_artifacts_serve_their_own_shape(served, tmp_path):
    status, images, sidecars = _ask(served.url, model="variant", **_values(seed=1))
    assert status == 200, sidecars
    expected_png, _ = _reference(served.artifacts["variant"], tmp_path, seed=1)
    assert images.shape == (1, 128, 192, 3)
    assert np.array_equal(images[0], _png_pixels(expected_png))


def test_klein_base_serves_with_classifier_free_guidance(served, tmp_path):
    request = {"seed": 2, "guidance": 3.5, "negative_prompt": "blurry"}
    status, images, sidecars = _ask(served.url, model="klein", **_values(prompt="a cat", **request))
    assert status == 200, sidecars
    assert sidecars[0]["classifier_free_guidance"] is True and sidecars[0]["negative_prompt"] == "blurry"
    expected_png, expected = _reference(served.artifacts["klein"], tmp_path, prompt="a cat", **request)
    assert expected["classifier_free_guidance"] is True
    assert np.array_equal(images[0], _png_pixels(expected_png))
    other = _ask(served.url, model="klein", **_values(prompt="a cat", **{**request, "negative_prompt": "sharp"}))
    assert not np.array_equal(images[0], other[1][0])  # the negative prompt reaches the model


def test_each_request_draws_with_its_own_loras_from_one_model(served, lora_files, tmp_path):
    """Two LoRA sets sent together (the batcher may hand both to one execute), then none: each image is
    runtime.generate's with that request's --lora on the same artifacts (issue 23)."""
    from common.metrics import psnr

    artifacts, folder = served.artifacts["lora"], lora_files["kohya"].parent
    sets = ("peft:0.7", "kohya:0.5", None)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda text: _ask(served.url, model="lora", **_values(seed=4, loras=text)), sets[:2]))
    answers.append(_ask(served.url, model="lora", **_values(seed=4)))  # after them: the slots back to zero
    assert [status for status, _, _ in answers] == [200] * 3, [a[2] for a in answers if a[0] != 200]
    images = []
    for text, (_, served_images, sidecars) in zip(sets, answers, strict=True):
        loras = [f"{folder / text.split(':')[0]}.safetensors:{text.split(':')[1]}"] if text else []
        expected_png, expected = _reference(artifacts, tmp_path / str(text), seed=4, loras=loras)
        assert psnr(served_images[0], _png_pixels(expected_png), data_range=255) >= 45, text  # measured: equal
        assert sidecars[0].get("loras") == expected.get("loras"), text  # file, sha256, format, scale, ranks
        images.append(served_images[0])
    # Each LoRA is visible (measured 22.2 dB between the sets, 31.7 dB from kohya:0.5 to none): this test can fail.
    assert psnr(images[0], images[1], data_range=255) < 35 and psnr(images[1], images[2], data_range=255) < 35


# The served `cached` model's --cache-threshold: on the tiny default the first block's residual moves by
# 0.9-1.5 a step, so 1.25 skips about half the steps (tests/test_step_cache.py).
CACHED_DEFAULT = 1.25


def test_the_step_cache_is_served_with_the_models_threshold_or_the_requests(served, tmp_path):
    """No cache_threshold: the model's 1.25, some steps skipped; 0: uncached; each image runtime.generate's with that
    --cache-threshold on the same artifacts (issue 25). Out of bounds, or on a model without the graphs: a 400."""
    from common.metrics import psnr

    artifacts, records = served.artifacts["cached"], []
    for sent, threshold in ((None, CACHED_DEFAULT), (0.0, 0.0)):
        status, images, sidecars = _ask(served.url, model="cached", **_values(seed=5, steps=8, cache_threshold=sent))
        assert status == 200, sidecars
        expected_png, expected = _reference(artifacts, tmp_path / str(sent), seed=5, steps=8, cache_threshold=threshold)
        assert psnr(images[0], _png_pixels(expected_png), data_range=255) >= 45, sent
        assert sidecars[0].get("cache") == expected.get("cache"), sent
        records.append(sidecars[0].get("cache"))
    assert records[0]["threshold"] == CACHED_DEFAULT and 0 < records[0]["skipped"] < 8, records
    assert records[1] is None  # threshold 0: the full graph, no cache record
    for model, sent, needle in (
        ("cached", -1.0, "cache_threshold -1.0 must be a finite number in 0..10"),
        ("flux2", 0.5, "cache_threshold: this model cannot run the step cache"),
    ):
        status, _, message = _ask(served.url, model=model, **_values(cache_threshold=sent))
        assert status == 400 and needle in message, (model, message)


def test_one_model_draws_each_exported_size_asked(served, tmp_path):
    """Two sizes sent together (the batcher may hand both to one execute), each drawn at its own size and equal
    to runtime.generate --height H --width W on the same artifacts (issue 24); a size not exported is a 400."""
    from common.metrics import psnr

    artifacts = served.artifacts["sizes"]
    asked = (None, (96, 160))  # neither height nor width: the first exported size, 128x128
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda size: _ask(served.url, model="sizes", **_values(seed=6, size=size)), asked))
    assert [status for status, _, _ in answers] == [200] * 2, [a[2] for a in answers if a[0] != 200]
    for size, (_, images, sidecars) in zip(asked, answers, strict=True):
        height, width = size or (128, 128)
        assert images.shape == (1, height, width, 3) and (sidecars[0]["height"], sidecars[0]["width"]) == (
            height,
            width,
        )
        expected_png, _ = _reference(artifacts, tmp_path / f"{height}x{width}", seed=6, size=size)
        assert psnr(images[0], _png_pixels(expected_png), data_range=255) >= 45, size  # measured: equal
    for size, reason in (((64, 64), "height 64 width 64 (64x64) was not exported"), ((96, None), "without width")):
        status, _, message = _ask(served.url, model="sizes", **_values(seed=6, size=size))
        assert status == 400 and reason in message and "\n" not in message, message
        assert "this model draws 128x128, 96x160, 160x96 (height x width)" in message, message


LORA_REFUSALS = [
    ("lora", "pef:0.7", "loras: no LoRA named 'pef' in this model's --lora-dir; it holds: kohya, peft, rank16"),
    ("lora", "rank16", "rank16.safetensors (rank 16) need rank 16 at"),
    ("lora", "peft:nan", "scale nan is not a finite number"),
    ("flux2", "peft", "this model's artifacts have no LoRA slots (exported without --lora-rank)"),
]


def test_loras_a_model_cannot_take_are_a_400_with_the_reason(served):
    for model, text, reason in LORA_REFUSALS:
        status, _, message = _ask(served.url, model=model, **_values(loras=text))
        assert status == 400 and reason in message and "\n" not in message, (text, message)
        if text == "rank16":
            assert "past the artifacts' LoRA slots of rank 8" in message, message


def test_artifacts_broken_after_generation_keep_the_server_from_ready(export_tiny, tmp_path):
    """The model refuses to load with the artifacts' one-line reason; the server exits instead of serving."""
    import shutil

    from deploy.local_server import LocalServer, processes_mentioning
    from deploy.triton import ModelSettings, write_repository

    artifacts = tmp_path / "artifacts"
    shutil.copytree(export_tiny("fp32"), artifacts)
    settings = ModelSettings(name="broken")
    repository = write_repository(artifacts=artifacts, repository=tmp_path / "repository", settings=settings).parent
    (artifacts / "transformer.onnx").unlink()
    server = LocalServer(repository, triton_env=_triton_env())
    with pytest.raises(RuntimeError, match="exited with 1 before ready"):
        server.start(timeout_s=120)
    assert "flux2 model broken: artifacts" in server.log() and "transformer.onnx is missing" in server.log()
    assert processes_mentioning(str(repository.resolve())) == []


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(served):
    """Last in this module: it stops the shared server."""
    answers = []

    def ask():
        answers.append(_ask(served.url, **_values(steps=100, num_images=2)))  # seconds each: in flight for sure

    drawn_before = _metric(served.metrics(), "flux2_images_total", model="flux2")
    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    # The batcher may take all three in one batch (nothing pending) or leave some queued: either way,
    # once the first image of these is drawn all three are on the server and none has finished
    # (each is 2 images of 100 steps, drawn one request after the other).
    deadline, held = time.monotonic() + 60, False
    while not held and time.monotonic() < deadline:
        held = _metric(served.metrics(), "flux2_images_total", model="flux2") > drawn_before
        time.sleep(0.02)
    assert held, "the requests never drew their first image"
    assert served.stop() == 0, "\n".join(served.log().splitlines()[-10:])
    for thread in threads:
        thread.join(timeout=60)
    assert [status for status, _, _ in answers] == [200] * 3, [a[2] for a in answers]
    assert re.search(r"successfully unloaded 'flux2'", served.log())


# --- deploy.serve owns its children (issue 26) ------------------------------------------------


def test_kill_9_of_tritonserver_mid_request_leaves_no_stub_and_no_shared_memory(export_tiny, tmp_path):
    """tritonserver SIGKILLed while it draws: one line, exit non-zero, its stub and /dev/shm files gone."""
    import os
    import signal

    from deploy.local_server import LocalServer, processes_mentioning
    from deploy.serve import leftovers, shm_prefix
    from deploy.triton import ModelSettings, write_repository

    settings = ModelSettings(name="flux2", backend="ort")
    repository = write_repository(artifacts=export_tiny("fp32"), repository=tmp_path / "repo", settings=settings).parent
    server = LocalServer(repository, triton_env=_triton_env()).start()
    try:
        prefix = shm_prefix(server.process.pid)
        stubs, files = leftovers(prefix)
        assert stubs and files, "the stub and its shared memory exist while serving (else this test sees nothing)"
        answers = []
        # Two images of 100 steps: once the first is counted, the request is drawing its second.
        values = _values(steps=100, num_images=2)

        def ask():
            try:
                answers.append(_ask(server.url, **values))
            except Exception as exc:  # noqa: BLE001  (the server is killed under it: the connection closes)
                answers.append(repr(exc))

        asking = [threading.Thread(target=ask)]
        for thread in asking:
            thread.start()
        deadline = time.monotonic() + 60
        while _metric(server.metrics(), "flux2_images_total", model="flux2") < 1:
            assert time.monotonic() < deadline, ("the request never drew its first image", answers)
            time.sleep(0.02)
        (triton,) = processes_mentioning(f"--model-repository={repository.resolve()}")
        os.kill(triton, signal.SIGKILL)
        status = server.process.wait(timeout=60)
        for thread in asking:
            thread.join(timeout=60)
        last = [line for line in server.log().splitlines() if line.strip()][-1]
        assert status == 128 + signal.SIGKILL and last.startswith("error: tritonserver was killed by SIGKILL"), last
        assert "stopped 1 Python-backend stub(s)" in last, last
        assert leftovers(prefix) == ([], []), leftovers(prefix)  # at once, not after the stub's own timeout
        time.sleep(10)
        assert leftovers(prefix) == ([], []) and processes_mentioning(str(repository.resolve())) == []
    finally:
        server.stop()  # also when an assertion fails: no server left behind


def test_a_busy_port_is_one_line_and_exit_2(tmp_path):
    import socket

    from deploy.local_server import free_ports
    from tests.support import assert_one_line_error

    repository = tmp_path / "repo"
    (repository / "m").mkdir(parents=True)
    (repository / "m" / "config.pbtxt").write_text('name: "m"\n')
    (port,) = free_ports(1)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = run_cli("-m", "deploy.serve", "--repository", str(repository), "--grpc-port", str(port))
    assert_one_line_error(result, f"--grpc-port {port} is already in use", "another port")
