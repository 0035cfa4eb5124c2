"""python -m deploy.triton: an artifacts folder -> a Triton model repository that serves it.

Writes REPO/<name>/config.pbtxt and REPO/<name>/1/model.py (this package's deploy/model.py,
which reads its settings from the config's parameters). `tritonserver --model-repository REPO`
(or `python -m deploy.serve --repository REPO`) then serves the folder.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from common.atomic import atomic_dir
from common.cli import OneLineParser, run_cli
from common.engine_manifest import targets_with_engines
from common.errors import UsageError
from common.specs import Shapes
from common.tensorrt_env import LABELS, Platform
from deploy.request import DEFAULT_MAX_IMAGES, DEFAULT_MAX_PROMPT_BYTES, MAX_CACHE_THRESHOLD
from runtime.backends.select import SERVED_BACKENDS

DEVICES = ("auto", "gpu", "cpu")
MODEL_TEMPLATE = Path(__file__).with_name("model.py")


@dataclass(frozen=True)
class ModelSettings:
    """How Triton serves one model: the generator's flags, with their defaults (the command line's too)."""

    name: str = "flux2"
    backend: str = "auto"  # one of runtime.backends.select.SERVED_BACKENDS
    device: str = "auto"  # one of DEVICES: the instances' kind (auto: the GPU where engines run)
    instances: int = 1  # model instances, each loading the engines once
    max_queue: int = 16  # requests waiting before Triton answers 503
    timeout_s: float = 300.0  # seconds a request may wait in the queue before 503
    max_images: int = DEFAULT_MAX_IMAGES  # images one request may ask for
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES  # UTF-8 bytes of prompt / negative_prompt, before tokenizing
    lora_dir: Path | None = None  # the .safetensors LoRAs a request's `loras` may name (artifacts with --lora-rank)
    cache_threshold: float = 0.0  # a request's step-cache threshold when it sends none (artifacts with --step-cache)

    def check(self) -> None:
        """UsageError, naming the flag, for a setting Triton or the model would refuse."""
        if self.backend not in SERVED_BACKENDS:
            raise UsageError(f"--backend {self.backend!r} is not one of {', '.join(SERVED_BACKENDS)}")
        if self.device not in DEVICES:
            raise UsageError(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.name):
            raise UsageError(f"--name {self.name!r} must be letters, digits, '_', '-', '.' (a Triton model name)")
        for flag, value, low in (
            ("--instances", self.instances, 1),
            ("--max-queue", self.max_queue, 1),
            ("--max-images", self.max_images, 1),
            ("--max-prompt-bytes", self.max_prompt_bytes, 1),
        ):
            if value < low:
                raise UsageError(f"{flag} {value} must be >= {low}")
        if not (math.isfinite(self.cache_threshold) and 0 <= self.cache_threshold <= MAX_CACHE_THRESHOLD):
            raise UsageError(
                f"--cache-threshold {self.cache_threshold} must be a finite number in 0..{MAX_CACHE_THRESHOLD:g} "
                "(0: no step cache by default)"
            )
        if not self.timeout_s > 0:
            raise UsageError(f"--timeout-s {self.timeout_s} must be > 0 (seconds a request may wait in the queue)")


DEFAULTS = ModelSettings()


def instance_kind(device: str, backend: str, artifacts: Path) -> str:
    """KIND_GPU where engines run (trt, or auto with built engines); a CPU node gets KIND_CPU."""
    if device == "gpu" or (device == "auto" and backend in ("trt", "auto") and _has_engines(artifacts)):
        return "KIND_GPU"
    return "KIND_CPU"


def _has_engines(artifacts: Path) -> bool:
    return bool(targets_with_engines(artifacts))


def engines_platform(artifacts: Path) -> Platform | None:
    """The platform the engines were built for, from the engine manifest; None without engines."""
    if not _has_engines(artifacts):
        return None
    from common.engine_manifest import read_engine_manifest

    target = targets_with_engines(artifacts)[0]
    platforms = {record.platform for record in read_engine_manifest(artifacts, target).engines.values()}
    if len(platforms) != 1:
        listed = sorted(json.dumps(p.to_json(), sort_keys=True) for p in platforms)
        raise UsageError(
            f"engines in {artifacts}/engines/{target} were built on different platforms {listed}; rebuild them"
        )
    return platforms.pop()


def engines_gpu(platform: Platform) -> str:
    """The GPU a TensorRT engine was built on, or the compute capabilities of TensorRT-RTX engines."""
    if platform.gpu is not None:
        return platform.gpu
    return "compute capabilities " + ",".join(platform.compute_capabilities or ())


MAX_ROWS = 8  # requests one execute takes at most (see rows_per_execute)
# How long Triton holds a first request for others to join its batch: a burst that arrives at an idle
# server then goes in one execute (8 concurrent tiny requests: 0.70-0.86 x the sequential time with it,
# 0.96-2.41 x without, docs/serving.md "Queue"); against seconds per image it is nothing.
GATHER_MICROSECONDS = 10_000


def rows_per_execute(max_queue: int) -> int:
    """How many waiting requests Triton hands the instance at once (the config's max_batch_size).

    With any queue policy Triton 2.51's batcher does not prefetch, and after each execution it
    often sleeps out its 500 ms poll before it sees the instance free (docs/serving.md, "Queue"):
    8 concurrent tiny requests took 1.3-3.3 x the time of 8 sequential ones. Taking every waiting
    request (up to MAX_ROWS) in one execute leaves at most one such gap per batch instead of one
    per request. The model draws them one after another and answers each as it is drawn. At most
    --max-queue requests wait in Triton's queue, and as many again may be held by the instance.
    """
    return max(1, min(MAX_ROWS, max_queue))


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parameters(settings: ModelSettings, artifacts: Path, platform: Platform | None) -> dict[str, str]:
    """The config's `parameters`, which deploy/model.py reads its settings from."""
    parameters = {
        "artifacts": str(artifacts),
        "backend": settings.backend,
        "max_images": str(settings.max_images),
        "max_prompt_bytes": str(settings.max_prompt_bytes),
    }
    if settings.lora_dir is not None:
        parameters["lora_dir"] = str(settings.lora_dir)
    if settings.cache_threshold:
        parameters["cache_threshold"] = repr(settings.cache_threshold)
    if platform:  # for the reader: which TensorRT the serving image must carry (docs/serving.md)
        parameters["engines_target"] = platform.target
        parameters["engines_tensorrt"] = platform.tensorrt
        parameters["engines_gpu"] = engines_gpu(platform)
    return parameters


def render_config(
    settings: ModelSettings, *, artifacts: Path, shapes: Shapes, kind: str, platform: Platform | None = None
) -> str:
    """config.pbtxt: inputs, outputs, instances, dynamic batching with a queue policy that refuses fast.

    Artifacts exported with K reference images also take `reference_images`: the K image files' bytes
    (PNG, JPEG, ...), decoded and fitted on the server as runtime.generate reads --image files. Artifacts
    exported at several sizes (`--resolutions`) answer images of the size asked, so `image` is declared
    [-1, -1, -1, 3] there; at one size it keeps that size's height and width.
    """
    parameter_text = ",\n".join(
        f"  {{ key: {_quoted(k)} value: {{ string_value: {_quoted(v)} }} }}"
        for k, v in _parameters(settings, artifacts, platform).items()
    )
    timeout_us = int(round(settings.timeout_s * 1e6))
    rows = rows_per_execute(settings.max_queue)
    height, width = (shapes.height, shapes.width) if len(shapes.sizes) == 1 else (-1, -1)
    references, count = "", shapes.reference_images
    if count:  # any length here, so that a wrong count gets the model's one-line 400, naming both
        references = (
            f",\n  # {count} encoded image file(s) (PNG, JPEG, ...), as runtime.generate's --image reads them"
            '\n  { name: "reference_images" data_type: TYPE_STRING dims: [ -1 ] }'
        )
    return f"""# Written by `python -m deploy.triton`; see docs/serving.md.
name: {_quoted(settings.name)}
backend: "python"
# One row per request. Triton hands the instance up to this many waiting requests at once; the model
# draws them one after another (the runtime draws one prompt per call) and answers each when drawn.
max_batch_size: {rows}
input [
  {{ name: "prompt" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "negative_prompt" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }},
  {{ name: "steps" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "guidance" data_type: TYPE_FP64 dims: [ 1 ] optional: true }},
  {{ name: "num_images" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  # "name[:scale],..." over the files of --lora-dir; declared on every model, so that a model serving
  # none answers it with its one-line 400 (docs/serving.md, "LoRA")
  {{ name: "loras" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  # one of the exported sizes, both or neither (neither: the first); declared on every model, so that a
  # size not exported is the model's one-line 400 naming those that are (docs/serving.md, "Sizes")
  {{ name: "height" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "width" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  # the first-block step cache's threshold (0: off; default the model's --cache-threshold); declared on
  # every model, so that one without the step cache's graphs answers it with its one-line 400
  {{ name: "cache_threshold" data_type: TYPE_FP64 dims: [ 1 ] optional: true }}{references}
]
output [
  {{ name: "image" data_type: TYPE_UINT8 dims: [ -1, {height}, {width}, 3 ] }},
  {{ name: "sidecar" data_type: TYPE_STRING dims: [ -1 ] }}
]
instance_group [ {{ count: {settings.instances} kind: {kind} }} ]
dynamic_batching {{
  max_queue_delay_microseconds: {GATHER_MICROSECONDS if rows > 1 else 0}
  # Past max_queue_size waiting requests, or after the timeout in the queue, Triton answers 503 at
  # once: overload is refused fast instead of left to time out at the client. The model holds the
  # same timeout for the requests of its batch ({rows - 1} at most) that it has not drawn yet.
  default_queue_policy {{
    timeout_action: REJECT
    default_timeout_microseconds: {timeout_us}
    allow_timeout_override: true
    max_queue_size: {settings.max_queue}
  }}
}}
parameters [
{parameter_text}
]
"""


def write_repository(*, artifacts: Path, repository: Path, settings: ModelSettings = DEFAULTS) -> Path:
    """Write REPO/<name>/ (replacing an earlier one atomically); returns the model folder."""
    from runtime.artifacts import open_artifacts

    settings.check()
    if settings.backend == "trt" and not _has_engines(artifacts):
        raise UsageError(
            f"--backend trt needs engines in {Path(artifacts) / 'engines'}; "
            f"run `python -m engines.build --artifacts {artifacts}` first, or use --backend ort"
        )
    opened = open_artifacts(artifacts)  # one-line error for a missing or damaged folder
    opened.check_prompt_room()  # a model whose chat template alone fills its length would refuse every prompt
    folder = opened.folder.resolve()
    if settings.lora_dir is not None:
        settings = replace(settings, lora_dir=check_lora_dir(settings.lora_dir, folder, opened.shapes))
    if settings.cache_threshold:
        from runtime.step_cache import check_artifacts

        check_artifacts(opened.manifest, folder)  # one line naming --step-cache
    platform = engines_platform(folder) if settings.backend != "ort" else None
    kind = instance_kind(settings.device, settings.backend, folder)
    config = render_config(settings, artifacts=folder, shapes=opened.shapes, kind=kind, platform=platform)
    repository = Path(repository).expanduser()
    if repository.exists() and not repository.is_dir():
        raise UsageError(f"--repository {repository} is a file; pass a folder")
    repository.mkdir(parents=True, exist_ok=True)
    target = repository / settings.name
    # Staged in a hidden sibling inside the repository (a leading '.', as before), so that a server
    # polling the repository never takes the half-written folder for a model.
    with atomic_dir(target) as staging:
        (staging / "1").mkdir()
        (staging / "config.pbtxt").write_text(config, encoding="utf-8")
        shutil.copyfile(MODEL_TEMPLATE, staging / "1" / "model.py")
    return target


def check_lora_dir(lora_dir: Path, artifacts: Path, shapes: Shapes) -> Path:
    """--lora-dir as the model reads it (absolute), refused in one line where no request could use it.

    deploy/model.py checks it again at load: the folder may have gone since the repository was written.
    """
    lora_dir = Path(lora_dir).expanduser()
    if not lora_dir.is_dir():
        raise UsageError(f"--lora-dir {lora_dir} is not a folder; pass the folder of .safetensors LoRAs requests name")
    if not shapes.lora_rank:
        raise UsageError(
            f"--lora-dir {lora_dir}: the artifacts {artifacts} have no LoRA slots (exported without --lora-rank); "
            "serve artifacts exported with python -m export ... --lora-rank R"
        )
    return lora_dir.resolve()


def main(argv=None) -> int:
    parser = OneLineParser(
        prog="python -m deploy.triton", description="Write a Triton model repository that serves an artifacts folder."
    )
    parser.add_argument("--artifacts", required=True, type=Path, help="folder written by `python -m export`")
    parser.add_argument("--repository", required=True, type=Path, help="model repository to write into")
    parser.add_argument("--name", default=DEFAULTS.name, help=f"model name (default {DEFAULTS.name})")
    parser.add_argument("--backend", default=DEFAULTS.backend, help=f"auto | trt | ort (default {DEFAULTS.backend})")
    parser.add_argument(
        "--device", default=DEFAULTS.device, help="auto | gpu | cpu: instance kind (auto: gpu with engines)"
    )
    parser.add_argument(
        "--instances", type=int, default=DEFAULTS.instances, help="model instances (engines loaded once each)"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULTS.max_queue,
        help=f"requests waiting before 503 (default {DEFAULTS.max_queue})",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULTS.timeout_s,
        help=f"seconds in the queue before 503 (default {DEFAULTS.timeout_s:g})",
    )
    parser.add_argument("--max-images", type=int, default=DEFAULTS.max_images, help="images per request at most")
    parser.add_argument(
        "--max-prompt-bytes",
        type=int,
        default=DEFAULTS.max_prompt_bytes,
        help=f"UTF-8 bytes of prompt and negative_prompt at most, checked before tokenizing "
        f"(default {DEFAULTS.max_prompt_bytes})",
    )
    parser.add_argument(
        "--lora-dir",
        type=Path,
        default=DEFAULTS.lora_dir,
        help="folder of .safetensors LoRAs a request may name in its `loras` input, NAME[:SCALE],... "
        "(artifacts exported with --lora-rank R; docs/serving.md)",
    )
    parser.add_argument(
        "--cache-threshold",
        type=float,
        default=DEFAULTS.cache_threshold,
        help="the step cache's threshold for requests that send no cache_threshold (artifacts exported with "
        "--step-cache; default 0: off; docs/cache.md)",
    )
    args = parser.parse_args(argv)
    settings = ModelSettings(
        name=args.name,
        backend=args.backend,
        device=args.device,
        instances=args.instances,
        max_queue=args.max_queue,
        timeout_s=args.timeout_s,
        max_images=args.max_images,
        max_prompt_bytes=args.max_prompt_bytes,
        lora_dir=args.lora_dir,
        cache_threshold=args.cache_threshold,
    )
    target = write_repository(artifacts=args.artifacts, repository=args.repository, settings=settings)
    print(f"wrote {target}/config.pbtxt and {target}/1/model.py")
    platform = engines_platform(args.artifacts) if args.backend != "ort" else None
    if platform:
        label = LABELS[platform.target]
        gpu = "that GPU model" if platform.gpu is not None else "a GPU of one of those compute capabilities"
        print(
            f"engines: {label} {platform.tensorrt} on {engines_gpu(platform)}: the serving image needs that {label} "
            f"and {gpu} (docs/serving.md)"
        )
    return 0


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
