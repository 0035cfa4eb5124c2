"""python -m deploy.openai_api: OpenAI's images API in front of a Triton model repository.

`/v1/images/generations` (JSON) and, for models served from editing artifacts, `/v1/images/edits`
(multipart image files) are turned into the KServe v2 request `deploy.client` sends, forwarded to
Triton's HTTP endpoint, and answered as OpenAI answers: `{"created", "data": [{"b64_json"}]}`, the
PNG being `runtime.generate.encode_png`'s bytes, so an image equals runtime.generate's file. Errors
carry OpenAI's body, `{"error": {"message", "type", "param", "code"}}`. `deploy.serve --openai-port`
runs this beside tritonserver (deploy/openai_front.py); docs/serving.md, "OpenAI images API".

FastAPI and uvicorn are imported inside the functions that need them: `--help` works without them.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (`Request`, imported
# inside create_app) as objects; as strings it could not resolve them and would answer 422.
import base64
import json
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.cli import OneLineParser, run_cli
from common.errors import UsageError
from deploy.request import DEFAULT_GUIDANCE, DEFAULT_STEPS, BadRequest, GenerationRequest, parse_request

# OpenAI fields that change nothing here (presentation, accounting): accepted and ignored, so that
# tools which always send them work. Any other unknown field is a 400 naming it (a typo'd `sede`
# must not silently draw seed 0).
IGNORED_FIELDS = frozenset(
    {
        "quality",
        "style",
        "user",
        "safety_identifier",
        "background",
        "moderation",
        "output_compression",
        "input_fidelity",
    }
)
# The fields flux2-trt adds (the openai client sends them through `extra_body`), with their types.
EXTRA_FIELDS = {"seed": int, "steps": int, "guidance": float, "negative_prompt": str, "loras": str}
OPENAI_FIELDS = {"model": str, "prompt": str, "n": int, "size": str, "response_format": str, "output_format": str}
INPUT_NAMES = ("prompt", "negative_prompt", "seed", "steps", "guidance", "num_images", "loras", "height", "width")


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: HTTP `status`, `type` (invalid_request_error, server_error), `param`, `code`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServedModel:
    """One model of the repository as the front needs it: its Triton name and its artifacts' shapes."""

    name: str
    width: int  # the default (first exported) size
    height: int
    max_images: int
    reference_images: int  # K > 0: editing artifacts, served on /v1/images/edits with exactly K images
    sizes: tuple[tuple[int, int], ...] = ()  # every exported (height, width), the default first; () that one

    def __post_init__(self):
        if not self.sizes:
            object.__setattr__(self, "sizes", ((self.height, self.width),))

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def size_names(self) -> list[str]:
        """The exported sizes as OpenAI's `size` names them, "WxH", the default first."""
        return [f"{width}x{height}" for height, width in self.sizes]


_PARAMETER = re.compile(r'\{ key: "((?:[^"\\]|\\.)*)" value: \{ string_value: "((?:[^"\\]|\\.)*)" \} \}')


def _unquote(text: str) -> str:  # the inverse of deploy.triton._quoted
    return re.sub(r"\\(.)", r"\1", text)


def served_models(repository: Path) -> dict[str, ServedModel]:
    """REPO/<name>/config.pbtxt (as deploy.triton writes it) -> name -> ServedModel, from each artifacts manifest.

    Read from the files, not asked of Triton: the front knows its sizes before the server is ready.
    """
    from common.manifest import read_manifest

    models = {}
    for config in sorted(Path(repository).glob("*/config.pbtxt")):
        parameters = {_unquote(k): _unquote(v) for k, v in _PARAMETER.findall(config.read_text(encoding="utf-8"))}
        if "artifacts" not in parameters:
            raise UsageError(
                f"{config} has no `artifacts` parameter; write the repository with `python -m deploy.triton`"
            )
        shapes = read_manifest(Path(parameters["artifacts"])).shapes
        max_images = int(parameters.get("max_images", "4"))
        name = config.parent.name  # Triton's model name is its folder's
        models[name] = ServedModel(name, shapes.width, shapes.height, max_images, shapes.reference_images, shapes.sizes)
    if not models:
        raise UsageError(f"--repository {repository} holds no model (no */config.pbtxt); write one with deploy.triton")
    return models


def pick_model(name, models: dict[str, ServedModel]) -> ServedModel:
    """The model a request names; with one model served, `model` may be left out."""
    if name is None and len(models) == 1:
        return next(iter(models.values()))
    if name not in models:
        served = ", ".join(sorted(models))
        given = "no model" if name is None else f"model {name!r}"
        raise OpenAIError(400, f"{given} is not served here; served: {served}", param="model", code="model_not_found")
    return models[name]


def _typed(fields: dict, name: str, kind: type, *, form: bool):
    """`fields[name]` as `kind` (None when absent); a multipart form's values arrive as text and are converted."""
    value = fields.get(name)
    if value is None or (kind is not str and isinstance(value, bool)):
        return None if value is None else _wrong_type(name, value, kind)
    if form and kind is not str and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            _wrong_type(name, value, kind)
    if kind is float and isinstance(value, int):
        return float(value)
    return value if isinstance(value, kind) else _wrong_type(name, value, kind)


def _wrong_type(name: str, value, kind: type):
    wanted = {int: "an integer", float: "a number", str: "a string"}[kind]
    raise OpenAIError(400, f"{name} {json.dumps(value)} must be {wanted}", param=name, code="invalid_type")


def _check_fields(fields: dict, *, form: bool) -> dict:
    """The request's known fields, typed; unknown ones refused, the unsupported OpenAI choices explained."""
    known = {**OPENAI_FIELDS, **EXTRA_FIELDS}
    for name in fields:
        if name not in known and name not in IGNORED_FIELDS and name != "stream":
            raise OpenAIError(
                400, f"unrecognized request argument supplied: {name}", param=name, code="unknown_parameter"
            )
    typed = {name: _typed(fields, name, kind, form=form) for name, kind in known.items()}
    if typed["prompt"] is None:
        raise OpenAIError(400, "missing required parameter: prompt", param="prompt", code="missing_required_parameter")
    if typed["response_format"] not in (None, "b64_json"):
        raise OpenAIError(
            400,
            f"response_format {typed['response_format']!r} is not served: only b64_json is (this server hosts no files)",
            param="response_format",
            code="invalid_value",
        )
    if typed["output_format"] not in (None, "png"):
        raise OpenAIError(400, f"output_format {typed['output_format']!r} is not served: only png is",
                          param="output_format", code="invalid_value")  # fmt: skip
    if fields.get("stream") not in (None, False, "false"):
        raise OpenAIError(400, "stream is not served: images are answered whole", param="stream", code="invalid_value")
    return typed


def generation_request(fields: dict, models: dict[str, ServedModel], *, form: bool = False):
    """An OpenAI images request (JSON body or multipart form fields) -> (ServedModel, GenerationRequest).

    `size` must be one of the exported sizes, "WxH" ("auto" or absent: the first); `n` 1..the model's
    max_images. The rest is checked by `deploy.request.parse_request`, the model's own rules, worded as it
    words them.
    """
    typed = _check_fields(fields, form=form)
    model = pick_model(typed["model"], models)
    names = model.size_names()
    if typed["size"] not in (None, "auto", *names):
        raise OpenAIError(
            400,
            f"size {typed['size']!r} is not served by model {model.name}: its artifacts were exported at "
            f"{', '.join(names)} (WxH); send one of them, or export with --resolutions",
            param="size",
            code="invalid_size",
        )
    height, width = model.sizes[names.index(typed["size"])] if typed["size"] in names else model.sizes[0]
    n = 1 if typed["n"] is None else typed["n"]
    if not 1 <= n <= model.max_images:
        raise OpenAIError(400, f"n {n} is outside 1..{model.max_images} (model {model.name}'s max_images)", param="n")
    values = {
        "prompt": typed["prompt"],
        "negative_prompt": typed["negative_prompt"],
        "seed": typed["seed"],
        "steps": DEFAULT_STEPS if typed["steps"] is None else typed["steps"],
        "guidance": DEFAULT_GUIDANCE if typed["guidance"] is None else typed["guidance"],
        "num_images": n,
        "loras": typed["loras"],  # "name[:scale],...": the model's --lora-dir files, checked by the model
        "height": height,
        "width": width,
    }
    try:
        return model, parse_request(values, max_images=model.max_images, sizes=model.sizes)
    except BadRequest as exc:
        raise OpenAIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None


def triton_error(exc) -> OpenAIError:
    """deploy.client.ServerError -> the answer: Triton's 400 stays a 400, its 503 (queue full, queue timeout) a 503.

    503 rather than 429: the server is full for everyone, not one client over its quota; it is what
    OpenAI answers when it is overloaded, and the openai client retries it with backoff, as it does 429.
    """
    reason = exc.reason
    if exc.status == 400:
        first = reason.split(" ", 1)[0].rstrip(":")  # "loras: no LoRA named ..."
        param = {"num_images": "n", "reference_images": "image", "height": "size", "width": "size"}.get(
            first, first if first in INPUT_NAMES else None
        )
        return OpenAIError(400, reason, param=param)
    if exc.status == 503:
        return OpenAIError(503, f"the server is busy, retry later ({reason})", type="server_error", code="server_busy")
    if exc.status is None:
        return OpenAIError(503, reason, type="server_error", code="triton_unreachable")
    return OpenAIError(500, reason, type="server_error", code=f"triton_{exc.status}")


def draw(triton_url: str, model: ServedModel, request: GenerationRequest, references=()) -> list[bytes]:
    """Forward one request to Triton; the PNG files of its images (runtime.generate's bytes)."""
    from deploy.client import ServerError, infer
    from runtime.generate import encode_png

    try:
        images, _ = infer(triton_url, model.name, request, reference_images=references)
    except ServerError as exc:
        raise triton_error(exc) from None
    return [encode_png(image) for image in images]


def images_response(pngs: list[bytes], request: GenerationRequest) -> dict:
    """OpenAI's answer; `size` the drawn one, "WxH" (`request.size` is the (height, width) parse_request read)."""
    data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs]
    height, width = request.size
    return {"created": int(time.time()), "data": data, "output_format": "png", "size": f"{width}x{height}"}


async def _edit_fields(http_request) -> tuple[dict, list[bytes]]:
    """A multipart /v1/images/edits body -> (its text fields, the image files' bytes in order)."""
    form = await http_request.form()  # a malformed body: Starlette's 400, answered in OpenAI's shape by create_app
    fields, images = {}, []
    for key, value in form.multi_items():
        if key in ("image", "image[]"):
            if isinstance(value, str):
                raise OpenAIError(400, "image must be an uploaded file (PNG, JPEG, WebP, ...)", param="image")
            images.append(await value.read())
        elif key in ("mask", "markup"):
            raise OpenAIError(400, f"{key} is not served: the FLUX.2 edit takes reference images only", param=key)
        else:
            fields[key] = value
    return fields, images


def create_app(models: dict[str, ServedModel], triton_url: str):
    """The ASGI application: the OpenAI routes for `models`, forwarded to Triton at `triton_url` (HOST:PORT)."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="flux2-trt OpenAI images API", docs_url=None, redoc_url=None)

    @app.exception_handler(OpenAIError)
    async def openai_error(_request, exc: OpenAIError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):  # FastAPI's own 422, were it ever raised
        return JSONResponse(OpenAIError(400, f"invalid request: {exc.errors()}").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):  # 404, 405: the same body shape as every other answer
        return JSONResponse(OpenAIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.post("/v1/images/generations")
    async def generations(http_request: Request):
        try:
            fields = json.loads(await http_request.body())
        except ValueError as exc:
            raise OpenAIError(400, f"the body is not JSON ({exc})") from None
        if not isinstance(fields, dict):
            raise OpenAIError(400, "the body must be a JSON object")
        model, request = generation_request(fields, models)
        # The blocking tritonclient call in a worker thread (anyio's 40): requests wait in Triton's queue, not here.
        return images_response(await run_in_threadpool(draw, triton_url, model, request), request)

    @app.post("/v1/images/edits")
    async def edits(http_request: Request):
        fields, images = await _edit_fields(http_request)
        model, request = generation_request(fields, models, form=True)
        if not model.reference_images:
            raise OpenAIError(400, f"model {model.name} is text-to-image; /v1/images/edits needs a model served "
                              "from editing artifacts (export --reference-images K)", param="model")  # fmt: skip
        if len(images) != model.reference_images:
            raise OpenAIError(400, f"{len(images)} image file(s) sent, but model {model.name} takes exactly "
                              f"{model.reference_images}", param="image")  # fmt: skip
        return images_response(await run_in_threadpool(draw, triton_url, model, request, images), request)

    @app.get("/v1/models")
    async def list_models():
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "flux2-trt"} for name in sorted(models)]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def run_front(*, repository: Path, triton_url: str, host: str, port: int, graceful_timeout_s: int = 300) -> int:
    """Serve the OpenAI routes until SIGTERM/SIGINT (uvicorn: stop taking requests, finish those in flight)."""
    try:
        import uvicorn
    except ImportError:
        raise UsageError("the OpenAI front needs FastAPI and uvicorn: pip install 'flux2-trt[serve]'") from None
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a TCP port (1..65535)")
    models = served_models(repository)
    sizes = ", ".join(f"{m.name} {'/'.join(m.size_names())}" for m in models.values())
    print(f"OpenAI images API on {host}:{port} -> Triton {triton_url} ({sizes})", file=sys.stderr)
    config = uvicorn.Config(create_app(models, triton_url), host=host, port=port,
                            timeout_graceful_shutdown=graceful_timeout_s, log_level="warning")  # fmt: skip
    server = uvicorn.Server(config)
    # uvicorn takes SIGTERM/SIGINT over while it runs and raises the signal again once drained; this
    # handler (rather than run_cli's, which reports an interruption and exits 143) makes that a clean
    # exit 0, and a signal that lands before uvicorn's handlers are in place still stops it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: setattr(server, "should_exit", True))
    server.run()
    return 0 if server.started else 1  # uvicorn logged why it did not start (a busy port)


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m deploy.openai_api", description="OpenAI's images API in front of Triton.")
    parser.add_argument("--repository", required=True, type=Path, help="the repository Triton serves")
    parser.add_argument("--triton-url", required=True, help="HOST:PORT of Triton's HTTP endpoint")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument(
        "--graceful-timeout-s", type=int, default=300, help="on SIGTERM, seconds for requests in flight"
    )
    return run_front(**vars(parser.parse_args(argv)))


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
