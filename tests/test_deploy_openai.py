"""OpenAI's images API in front of Triton (`deploy.serve --openai-port`), asked with the official `openai` client.

The fast tests check the request mapping (deploy/openai_api.py) without a server. The slow ones run
the real tritonserver 2.51 with the front beside it, on the tiny fp32 artifacts (`flux2`, and
`flux2_q1` with a queue of one for 503), and call `OpenAI(base_url=...).images.generate(...)` as a
user does. The last server test stops the shared server with SIGTERM while a request is in flight.
"""

from __future__ import annotations

import base64
import signal
import threading
import time

import pytest

from deploy.openai_api import OpenAIError, ServedModel, generation_request, triton_error

PROMPT = "a red fox in fresh snow"
STEPS = 2
MODELS = {"flux2": ServedModel("flux2", width=256, height=128, max_images=4, reference_images=0)}


def _refused(fields, *, form=False) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        generation_request(fields, MODELS, form=form)
    assert caught.value.status == 400
    return caught.value


def test_a_request_maps_to_the_generation_request_the_model_reads():
    fields = {"model": "flux2", "prompt": "a fox", "n": 2, "size": "256x128", "response_format": "b64_json",
              "seed": 3, "steps": 2, "guidance": 1, "negative_prompt": "", "quality": "high"}  # fmt: skip
    model, request = generation_request(fields, MODELS)
    assert model.name == "flux2"
    assert (request.prompt, request.seed, request.steps, request.guidance, request.num_images) == (
        "a fox",
        3,
        2,
        1.0,
        2,
    )
    # Left out: the exported size, one image, and deploy.request's defaults (runtime.generate's).
    _, plain = generation_request({"prompt": "a fox"}, MODELS)
    assert (plain.seed, plain.steps, plain.guidance, plain.num_images) == (0, 50, 4.0, 1)
    # A multipart form (/v1/images/edits) sends text: numbers are converted.
    _, form = generation_request({"prompt": "a fox", "n": "2", "seed": "7", "guidance": "2.5"}, MODELS, form=True)
    assert (form.num_images, form.seed, form.guidance) == (2, 7, 2.5)
    # extra_body={"loras": ...}: handed to the model's `loras` input as deploy.client sends it
    _, styled = generation_request({"prompt": "a fox", "loras": "peft:0.7, kohya"}, MODELS)
    assert styled.loras == (("peft", 0.7), ("kohya", 1.0)) and plain.loras == ()
    from deploy.request import loras_text, parse_loras

    assert parse_loras(loras_text(styled.loras)) == styled.loras


def test_size_picks_any_exported_size_and_a_size_not_exported_lists_them():
    """OpenAI's size is "WxH"; the model's height and width inputs carry it (deploy.request.parse_size)."""
    sizes = ((128, 128), (96, 160), (160, 96))  # (height, width)
    models = {"sizes": ServedModel("sizes", width=128, height=128, max_images=4, reference_images=0, sizes=sizes)}
    assert models["sizes"].size_names() == ["128x128", "160x96", "96x160"]
    for size, drawn in ((None, (128, 128)), ("auto", (128, 128)), ("160x96", (96, 160)), ("96x160", (160, 96))):
        _, request = generation_request({"prompt": "a fox", **({"size": size} if size else {})}, models)
        assert request.size == drawn, size
    with pytest.raises(OpenAIError) as caught:
        generation_request({"prompt": "a fox", "size": "64x64"}, models)
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "size", "invalid_size")
    assert "exported at 128x128, 160x96, 96x160 (WxH)" in caught.value.message
    assert MODELS["flux2"].sizes == ((128, 256),)  # one size: the model's own


REFUSED = [
    ({"prompt": "a fox", "size": "1024x1024"}, "size", "size '1024x1024' is not served by model flux2: its artifacts were exported at 256x128"),
    ({"prompt": "a fox", "n": 5}, "n", "n 5 is outside 1..4"),
    ({"prompt": "a fox", "model": "dall-e-3"}, "model", "model 'dall-e-3' is not served here; served: flux2"),
    ({"prompt": "a fox", "response_format": "url"}, "response_format", "only b64_json is (this server hosts no files)"),
    ({"prompt": "a fox", "output_format": "jpeg"}, "output_format", "only png is"),
    ({"prompt": "a fox", "sede": 3}, "sede", "unrecognized request argument supplied: sede"),
    ({"prompt": "a fox", "seed": 1.5}, "seed", "seed 1.5 must be an integer"),
    ({"prompt": "a fox", "seed": True}, "seed", "seed true must be an integer"),
    ({"prompt": "a fox", "seed": 2**63}, "seed", "seed 9223372036854775808 must be in [0, 2**63)"),
    ({"prompt": "a fox", "steps": 0}, "steps", "steps 0 is outside 1..100"),
    ({"prompt": "a fox", "guidance": float("inf")}, "guidance", "guidance inf must be a finite number >= 0"),
    ({"n": 1}, "prompt", "missing required parameter: prompt"),
    ({"prompt": "a fox", "loras": "peft:nan"}, "loras", "scale nan is not a finite number"),
    ({"prompt": "a fox", "stream": True}, "stream", "stream is not served: images are answered whole"),
]  # fmt: skip


@pytest.mark.parametrize("fields, param, message", REFUSED, ids=[case[1] + "-" + case[2][:20] for case in REFUSED])
def test_a_bad_request_is_a_400_naming_the_parameter(fields, param, message):
    error = _refused(fields)
    assert message in error.message and error.param == param, error.body()
    assert error.body()["error"].keys() == {"message", "type", "param", "code"}
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_a_form_value_that_is_no_number_is_a_400():
    error = _refused({"prompt": "a fox", "steps": "two"}, form=True)
    assert error.param == "steps" and 'steps "two" must be an integer' in error.message


def test_tritons_answers_map_to_openai_statuses():
    from deploy.client import ServerError

    refused = triton_error(ServerError("...", status=400, reason="prompt is 300 tokens once formatted, past the 128"))
    assert (refused.status, refused.type, refused.param) == (400, "invalid_request_error", "prompt")
    busy = triton_error(ServerError("...", status=503, reason="Exceeds maximum queue size"))
    assert (busy.status, busy.type, busy.code) == (503, "server_error", "server_busy")
    assert "Exceeds maximum queue size" in busy.message
    gone = triton_error(ServerError("cannot reach server 127.0.0.1:1"))
    assert (gone.status, gone.code) == (503, "triton_unreachable")
    unknown = triton_error(ServerError("...", status=400, reason="loras: no LoRA named 'x' in this model's --lora-dir"))
    assert (unknown.status, unknown.param) == (400, "loras")
    failed = triton_error(ServerError("...", status=500, reason="generation failed: RuntimeError: x"))
    assert (failed.status, failed.type) == (500, "server_error")


# --- the real server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, export_tiny):
    import numpy as np
    from PIL import Image

    from common.specs import Shapes
    from deploy.local_server import LocalServer, processes_mentioning
    from deploy.triton import ModelSettings, write_repository
    from export.run import export_artifacts
    from tests.support import triton_env

    env = triton_env()
    tiny = export_tiny("fp32")
    root = tmp_path_factory.mktemp("served-openai")
    # Editing artifacts (one reference image, 128 x 128) for /v1/images/edits, as test_deploy_editing.py exports them.
    editing = root / "editing"
    shapes = Shapes(height=128, width=128, max_sequence_length=128, reference_images=1)
    export_artifacts(model="tiny", out=editing, shapes=shapes, skip_check=True, log=lambda m: None)
    repository = root / "repository"
    for artifacts, settings in (
        (tiny, ModelSettings(name="flux2", backend="ort")),
        (tiny, ModelSettings(name="flux2_q1", backend="ort", max_queue=1)),
        (editing, ModelSettings(name="flux2_edit", backend="ort")),
    ):
        write_repository(artifacts=artifacts, repository=repository, settings=settings)
    # A JPEG of another size than exported: the server fits it to 128 x 128, as runtime.generate --image does.
    y, x = np.mgrid[0:200, 0:150]
    pixels = np.stack([x * 255 // 150, y * 255 // 200, (x + y) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(root / "reference.jpg", quality=90)
    server = LocalServer(repository, triton_env=env, openai=True)
    server.start()
    server.artifacts, server.editing, server.image = tiny, editing, root / "reference.jpg"
    yield server
    server.stop()
    assert processes_mentioning(str(repository.resolve())) == [], "a server, front or stub process outlived the test"


def _client(server, **options):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{server.openai_port}/v1", api_key="unused", **options)


def _metric(server, name: str, model: str) -> float:
    """One Prometheus metric of `model`, summed over its label sets."""
    lines = [
        line for line in server.metrics().splitlines() if line.startswith(name + "{") and f'model="{model}"' in line
    ]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def _reference_pngs(artifacts, tmp_path, *, seed, num_images=1) -> list[bytes]:
    from runtime.generate import generate

    paths = generate(artifacts=artifacts, prompts=[PROMPT], out=tmp_path / "reference", backend="ort", progress=False,
                     log=lambda m: None, steps=STEPS, seed=seed, num_images=num_images)  # fmt: skip
    return [path.read_bytes() for path in paths]


@pytest.mark.slow
def test_images_generate_returns_the_png_runtime_generate_writes(served, tmp_path):
    expected = _reference_pngs(served.artifacts, tmp_path, seed=3)
    answer = _client(served).images.generate(model="flux2", prompt=PROMPT, n=1, size="256x256",
                                             response_format="b64_json", extra_body={"seed": 3, "steps": STEPS})  # fmt: skip
    assert [base64.b64decode(image.b64_json) for image in answer.data] == expected  # byte for byte
    assert answer.size == "256x256" and answer.output_format == "png"


@pytest.mark.slow
def test_n_images_are_runtime_generates_num_images(served, tmp_path):
    expected = _reference_pngs(served.artifacts, tmp_path, seed=5, num_images=2)
    answer = _client(served).images.generate(model="flux2", prompt=PROMPT, n=2, response_format="b64_json",
                                             extra_body={"seed": 5, "steps": STEPS})  # fmt: skip
    assert [base64.b64decode(image.b64_json) for image in answer.data] == expected


@pytest.mark.slow
def test_a_size_not_exported_is_a_bad_request_error(served):
    import openai

    with pytest.raises(openai.BadRequestError, match=r"size '1024x1024' is not served by model flux2") as caught:
        _client(served).images.generate(model="flux2", prompt=PROMPT, size="1024x1024", response_format="b64_json")
    error = caught.value
    assert error.status_code == 400 and error.param == "size" and error.type == "invalid_request_error"
    assert "exported at 256x256 (WxH)" in error.message


@pytest.mark.slow
def test_tritons_own_refusal_reaches_the_client_as_a_bad_request_error(served):
    """Prompt length is the model's check (its tokenizer): Triton's 400 comes back as OpenAI's 400, same words."""
    import openai

    with pytest.raises(openai.BadRequestError, match=r"tokens once formatted, past the 128") as caught:
        _client(served).images.generate(model="flux2", prompt="fox " * 200, extra_body={"steps": STEPS})
    assert caught.value.param == "prompt"


@pytest.mark.slow
def test_url_responses_and_unknown_models_are_refused(served):
    import openai

    client = _client(served)
    with pytest.raises(openai.BadRequestError, match="only b64_json is"):
        client.images.generate(model="flux2", prompt=PROMPT, response_format="url")
    with pytest.raises(
        openai.BadRequestError, match=r"model 'gpt-image-1' is not served here; served: flux2, flux2_edit, flux2_q1"
    ):
        client.images.generate(model="gpt-image-1", prompt=PROMPT)
    assert sorted(model.id for model in client.models.list()) == ["flux2", "flux2_edit", "flux2_q1"]


@pytest.mark.slow
def test_images_edit_returns_the_png_runtime_generate_draws_from_the_same_file(served, tmp_path):
    from runtime.generate import generate

    expected = generate(artifacts=served.editing, prompts=["make the fox blue"], out=tmp_path / "generate",
                        backend="ort", progress=False, log=lambda m: None, steps=STEPS, seed=4, images=[served.image])  # fmt: skip
    with open(served.image, "rb") as image:
        answer = _client(served).images.edit(model="flux2_edit", image=image, prompt="make the fox blue",
                                             response_format="b64_json", extra_body={"seed": 4, "steps": STEPS})  # fmt: skip
    assert [base64.b64decode(image.b64_json) for image in answer.data] == [expected[0].read_bytes()]
    assert answer.size == "128x128"


@pytest.mark.slow
def test_edits_refuse_a_wrong_image_count_and_text_to_image_models(served):
    import openai

    client = _client(served)
    data = served.image.read_bytes()
    with pytest.raises(openai.BadRequestError, match=r"2 image file\(s\) sent, but model flux2_edit takes exactly 1"):
        client.images.edit(model="flux2_edit", image=[("a.jpg", data), ("b.jpg", data)], prompt="blue")
    with pytest.raises(openai.BadRequestError, match=r"model flux2 is text-to-image; /v1/images/edits needs"):
        client.images.edit(model="flux2", image=("a.jpg", data), prompt="blue")
    with pytest.raises(openai.BadRequestError, match=r"mask is not served"):
        client.images.edit(model="flux2_edit", image=("a.jpg", data), mask=("m.png", data), prompt="blue")


@pytest.mark.slow
def test_a_full_queue_is_a_503_with_an_openai_body(served):
    """flux2_q1: one request running, one waiting; the rest get Triton's 503, handed on as OpenAI's overload."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = _client(served, max_retries=0)  # the client would retry a 503; here the answer itself is the point

    def ask(_):
        try:
            client.images.generate(model="flux2_q1", prompt=PROMPT, n=4, extra_body={"steps": 100})
            return 200, None
        except openai.APIStatusError as exc:
            return exc.status_code, exc.body

    rejected_before = _metric(served, "flux2_requests_rejected_total", "flux2_q1")
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    statuses = sorted(status for status, _ in answers)
    assert statuses.count(503) >= 1 and set(statuses) <= {200, 503} and statuses.count(200) >= 2, answers
    # The front reaches Triton through deploy.serve's HTTP port: each of its 503s is counted there.
    assert _metric(served, "flux2_requests_rejected_total", "flux2_q1") - rejected_before == statuses.count(503)
    for status, body in answers:
        if status == 503:
            assert body["type"] == "server_error" and body["code"] == "server_busy", body
            assert "Exceeds maximum queue size" in body["message"], body


@pytest.mark.slow
def test_sigterm_stops_the_front_taking_requests_lets_those_in_flight_finish_then_exits_0(served):
    """Last server test here: it stops the shared server while two requests are in flight at the front."""
    import openai

    from deploy.local_server import processes_mentioning

    answers, started = [], time.monotonic()

    def ask():
        try:
            answer = _client(served).images.generate(model="flux2", prompt=PROMPT, n=2, extra_body={"steps": 100})
        except Exception as exc:  # noqa: BLE001  (named in the assertion below)
            answers.append((repr(exc), time.monotonic() - started))
            return
        answers.append((len(answer.data), time.monotonic() - started))

    drawn_before = _metric(served, "flux2_images_total", "flux2")
    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    # Batched together or one queued behind the other: once the first of their images is drawn both
    # are on Triton and neither has finished (2 images of 100 steps each).
    deadline, held = time.monotonic() + 60, False
    while not held and time.monotonic() < deadline:
        held = _metric(served, "flux2_images_total", "flux2") > drawn_before
        time.sleep(0.02)
    assert held, "the two requests never drew their first image"
    stopped = time.monotonic() - started
    served.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(openai.APIConnectionError):  # the front no longer listens
        _client(served, max_retries=0).images.generate(model="flux2", prompt=PROMPT, extra_body={"steps": STEPS})
    assert served.stop() == 0, "\n".join(served.log().splitlines()[-10:])
    for thread in threads:
        thread.join(timeout=60)
    assert [count for count, _ in answers] == [2, 2], ("a request in flight did not finish", answers)
    assert all(seconds > stopped for _, seconds in answers), (stopped, answers)  # both spanned the SIGTERM
    assert processes_mentioning(str(served.repository)) == []


@pytest.mark.slow
def test_the_front_dying_stops_triton_and_the_exit_is_not_0(export_tiny, tmp_path):
    import os

    from deploy.local_server import LocalServer, processes_mentioning
    from deploy.triton import ModelSettings, write_repository
    from tests.support import triton_env

    repository = tmp_path / "repository"
    write_repository(artifacts=export_tiny("fp32"), repository=repository, settings=ModelSettings(backend="ort"))
    server = LocalServer(repository, triton_env=triton_env(), openai=True).start()
    try:
        [front] = processes_mentioning(f"deploy.openai_api --repository {repository.resolve()}")
        os.kill(front, signal.SIGKILL)
        server.process.wait(timeout=60)
    finally:
        status = server.stop()
    lines = [line for line in server.log().splitlines() if line.startswith("error:")]
    assert status != 0 and lines == ["error: the OpenAI front was killed by SIGKILL; stopping tritonserver"], lines
    assert processes_mentioning(str(repository.resolve())) == []


def test_the_http_layer_answers_in_openais_shape_without_triton(tmp_path):
    """The app under uvicorn with Triton unreachable: 503 for a valid request, OpenAI's body for every error."""
    import json
    import urllib.error
    import urllib.request

    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from deploy.local_server import free_ports
    from deploy.openai_api import create_app

    [triton_port, port] = free_ports(2)  # nothing listens on the first: Triton is "not up"
    config = uvicorn.Config(create_app(MODELS, f"127.0.0.1:{triton_port}"), port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def post(path, data: bytes, content_type="application/json"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST")
        request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        status, body = post("/v1/images/generations", json.dumps({"prompt": "a fox", "steps": 2}).encode())
        assert status == 503 and body["error"]["code"] == "triton_unreachable", body
        status, body = post("/v1/images/generations", b"{not json")
        assert status == 400 and body["error"]["message"].startswith("the body is not JSON"), body
        status, body = post("/v1/images/edits", b"--x\r\nbroken", "multipart/form-data; boundary=x")
        assert status == 400 and body["error"]["type"] == "invalid_request_error", body
        status, body = post("/v1/images/variations", b"{}")
        assert status == 404 and body["error"]["message"] == "Not Found", body
    finally:
        server.should_exit = True
        thread.join(timeout=10)
