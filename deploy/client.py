"""python -m deploy.client: ask a Triton server for an image; write the PNG and sidecar runtime.generate writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common.cli import OneLineParser, run_cli
from common.errors import Flux2TrtError, UsageError
from deploy.request import DEFAULT_GUIDANCE, DEFAULT_STEPS, BadRequest, GenerationRequest, loras_text, parse_loras


class ServerError(Flux2TrtError):
    """The server answered an error (bad request, overload, failure) or could not be reached.

    `status`: the HTTP status Triton answered (None: not reached); `reason`: Triton's own message,
    which deploy.openai_api hands on in its error bodies.
    """

    def __init__(self, message: str, *, status: int | None = None, reason: str = ""):
        super().__init__(message)
        self.status, self.reason = status, reason or message


def request_inputs(module, request: GenerationRequest, reference_images=()):
    """The model's inputs as tritonclient InferInput objects (`module`: tritonclient.http or .grpc).

    `reference_images`: the files' bytes as they are on disk; the server decodes and fits them.
    """
    import numpy as np

    values = {
        "prompt": np.array([[request.prompt.encode()]], dtype=np.object_),
        "seed": np.array([[request.seed]], dtype=np.int64),
        "steps": np.array([[request.steps]], dtype=np.int32),
        "guidance": np.array([[request.guidance]], dtype=np.float64),
        "num_images": np.array([[request.num_images]], dtype=np.int32),
    }
    if request.negative_prompt:
        values["negative_prompt"] = np.array([[request.negative_prompt.encode()]], dtype=np.object_)
    if request.loras:
        values["loras"] = np.array([[loras_text(request.loras).encode()]], dtype=np.object_)
    if request.size is not None:  # None: the model's first exported size
        values["height"] = np.array([[request.size[0]]], dtype=np.int32)
        values["width"] = np.array([[request.size[1]]], dtype=np.int32)
    if reference_images:
        values["reference_images"] = np.array([list(reference_images)], dtype=np.object_)
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in values.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def infer(url: str, model: str, request: GenerationRequest, *, reference_images=(), timeout_s: float = 600.0):
    """One request over HTTP; returns (images uint8 [K, H, W, 3], sidecars as dicts)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    try:
        with httpclient.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s) as client:
            outputs = [httpclient.InferRequestedOutput(name, binary_data=True) for name in ("image", "sidecar")]
            result = client.infer(model, request_inputs(httpclient, request, reference_images), outputs=outputs)
    except InferenceServerException as exc:
        status = int(exc.status()) if str(exc.status() or "").isdigit() else None
        answered = f"HTTP {exc.status()}: " if exc.status() else ""
        message = f"server {url} model {model} answered {answered}{exc.message()}"
        raise ServerError(message, status=status, reason=exc.message()) from None
    except OSError as exc:
        raise ServerError(f"cannot reach server {url} ({exc}); is `python -m deploy.serve` running?") from None
    images = result.as_numpy("image")[0]  # [K, H, W, 3]
    sidecars = [json.loads(text) for text in result.as_numpy("sidecar")[0]]
    return images, sidecars


def fetch(
    request: GenerationRequest,
    *,
    url: str,
    model: str = "flux2",
    out: Path = Path("out"),
    images: list[Path] | None = None,
) -> list[Path]:
    """Write `000-<image>-seed<seed>.png` + `.json` per image into `out`, as runtime.generate names them.

    `request`: what the server's model reads (deploy.request's record of it). `images`: reference
    image files for a model served from editing artifacts, sent as their bytes.
    """
    from runtime.generate import check_out, make_out, save_image
    from runtime.pipeline import check_seed

    check_seed(request.seed)
    images = [Path(p) for p in images or []]
    for path in images:
        if not path.expanduser().is_file():
            raise UsageError(f"--image {path} does not exist; pass an image file (PNG, JPEG, WebP, ...)")
    reference_images = [path.expanduser().read_bytes() for path in images]
    out = check_out(out)
    drawn, sidecars = infer(url, model, request, reference_images=reference_images)
    written = []
    for image, sidecar in zip(drawn, sidecars, strict=True):
        if images:  # the sidecar runtime.generate writes names the --image files
            sidecar = {**sidecar, "images": [str(p) for p in images]}
        stem = f"000-{sidecar['image_index']:02d}-seed{sidecar['seed']}"
        written.append(save_image(make_out(out), stem, image, sidecar))
        print(f"wrote {written[-1]} ({sidecar['timings'].get('total_s', 0):.2f} s on the server)", file=sys.stderr)
    return written


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m deploy.client", description="Draw images on a Triton server.")
    parser.add_argument("--url", required=True, help="HOST:PORT of the server's HTTP endpoint")
    parser.add_argument("--model", default="flux2", help="model name (default flux2)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument(
        "--height", type=int, default=None, help="image height: one of the model's exported sizes (default: the first)"
    )
    parser.add_argument(
        "--width", type=int, default=None, help="image width: one of the model's exported sizes (default: the first)"
    )
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for PNGs and JSON sidecars")
    parser.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        help="reference image for a model served from editing artifacts; repeat for several",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME[:SCALE]",
        help="a LoRA of the model's --lora-dir (its file stem) at SCALE (default 1.0); repeat to stack several",
    )
    args = parser.parse_args(argv)
    if (args.height is None) != (args.width is None):
        parser.error(f"--height {args.height} --width {args.width}: give both (one of the model's sizes), or neither")
    try:
        loras = parse_loras(",".join(args.lora))
    except BadRequest as exc:
        raise UsageError(f"--lora: {exc}") from None
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        num_images=args.num_images,
        loras=loras,
        size=None if args.height is None else (args.height, args.width),
    )
    fetch(request, url=args.url, model=args.model, out=args.out, images=args.image)
    return 0


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
