"""python -m deploy.triton: an artifacts folder -> a Triton model repository that serves it.

Writes REPO/<name>/config.pbtxt and REPO/<name>/1/model.py (this package's deploy/model.py,
which reads its settings from the config's parameters). `tritonserver --model-repository REPO`
(or `python -m deploy.serve --repository REPO`) then serves the folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from common.cli import OneLineParser, run_cli
from common.errors import UsageError
from common.tensorrt_env import LABELS, Platform
from deploy.request import DEFAULT_MAX_IMAGES
from runtime.backends.select import SERVED_BACKENDS

DEVICES = ("auto", "gpu", "cpu")
MODEL_TEMPLATE = Path(__file__).with_name("model.py")


def instance_kind(device: str, backend: str, artifacts: Path) -> str:
    """KIND_GPU where engines run (trt, or auto with built engines); a CPU node gets KIND_CPU."""
    if device == "gpu" or (device == "auto" and backend in ("trt", "auto") and _has_engines(artifacts)):
        return "KIND_GPU"
    return "KIND_CPU"


def _engine_targets(artifacts: Path) -> list[str]:
    """The targets (tensorrt, then rtx: the trt backend's order) with engines built in `artifacts`."""
    from common.engine_manifest import ENGINE_MANIFEST_NAME, engines_dir
    from common.tensorrt_env import TARGETS

    return [t for t in TARGETS if (engines_dir(artifacts, t) / ENGINE_MANIFEST_NAME).is_file()]


def _has_engines(artifacts: Path) -> bool:
    return bool(_engine_targets(artifacts))


def engines_platform(artifacts: Path) -> Platform | None:
    """The platform the engines were built for, from the engine manifest; None without engines."""
    if not _has_engines(artifacts):
        return None
    from common.engine_manifest import read_engine_manifest

    target = _engine_targets(artifacts)[0]
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


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(
    *,
    name: str,
    artifacts: Path,
    backend: str,
    batch_size: int,
    height: int,
    width: int,
    kind: str,
    instances: int,
    max_queue: int,
    timeout_s: float,
    max_images: int,
    platform: Platform | None = None,
    reference_images: int = 0,
) -> str:
    """config.pbtxt: inputs, outputs, instances, dynamic batching with a queue policy that refuses fast.

    Artifacts exported with K reference images also take `reference_images`: the K image files' bytes
    (PNG, JPEG, ...), decoded and fitted on the server as runtime.generate reads --image files.
    """
    parameters = {"artifacts": str(artifacts), "backend": backend, "max_images": str(max_images)}
    if platform:  # for the reader: which TensorRT the serving image must carry (docs/serving.md)
        parameters["engines_target"] = platform.target
        parameters["engines_tensorrt"] = platform.tensorrt
        parameters["engines_gpu"] = engines_gpu(platform)
    parameter_text = ",\n".join(
        f"  {{ key: {_quoted(k)} value: {{ string_value: {_quoted(v)} }} }}" for k, v in parameters.items()
    )
    timeout_us = int(round(timeout_s * 1e6))
    references = ""
    if reference_images:  # any length here, so that a wrong count gets the model's one-line 400, naming both
        references = (
            f",\n  # {reference_images} encoded image file(s) (PNG, JPEG, ...), as runtime.generate's --image reads them"
            '\n  { name: "reference_images" data_type: TYPE_STRING dims: [ -1 ] }'
        )
    return f"""# Written by `python -m deploy.triton`; see docs/serving.md.
name: {_quoted(name)}
backend: "python"
# One row per request; rows of one batch are drawn one request after another (the runtime draws
# one prompt per call), so the batch size only lets Triton hand an instance the engines' batch.
max_batch_size: {batch_size}
input [
  {{ name: "prompt" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "negative_prompt" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }},
  {{ name: "steps" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "guidance" data_type: TYPE_FP64 dims: [ 1 ] optional: true }},
  {{ name: "num_images" data_type: TYPE_INT32 dims: [ 1 ] optional: true }}{references}
]
output [
  {{ name: "image" data_type: TYPE_UINT8 dims: [ -1, {height}, {width}, 3 ] }},
  {{ name: "sidecar" data_type: TYPE_STRING dims: [ -1 ] }}
]
instance_group [ {{ count: {instances} kind: {kind} }} ]
dynamic_batching {{
  # Past max_queue_size waiting requests, or after the timeout in the queue, Triton answers 503 at
  # once: overload is refused fast instead of left to time out at the client.
  default_queue_policy {{
    timeout_action: REJECT
    default_timeout_microseconds: {timeout_us}
    allow_timeout_override: true
    max_queue_size: {max_queue}
  }}
}}
parameters [
{parameter_text}
]
"""


def write_repository(
    *,
    artifacts: Path,
    repository: Path,
    name: str = "flux2",
    backend: str = "auto",
    device: str = "auto",
    instances: int = 1,
    max_queue: int = 16,
    timeout_s: float = 300.0,
    max_images: int = DEFAULT_MAX_IMAGES,
) -> Path:
    """Write REPO/<name>/ (replacing an earlier one atomically); returns the model folder."""
    from runtime.artifacts import open_artifacts

    if backend not in SERVED_BACKENDS:
        raise UsageError(f"--backend {backend!r} is not one of {', '.join(SERVED_BACKENDS)}")
    if device not in DEVICES:
        raise UsageError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise UsageError(f"--name {name!r} must be letters, digits, '_', '-', '.' (a Triton model name)")
    for flag, value, low in (
        ("--instances", instances, 1),
        ("--max-queue", max_queue, 1),
        ("--max-images", max_images, 1),
    ):
        if value < low:
            raise UsageError(f"{flag} {value} must be >= {low}")
    if not timeout_s > 0:
        raise UsageError(f"--timeout-s {timeout_s} must be > 0 (seconds a request may wait in the queue)")
    if backend == "trt" and not _has_engines(artifacts):
        raise UsageError(
            f"--backend trt needs engines in {Path(artifacts) / 'engines'}; "
            f"run `python -m engines.build --artifacts {artifacts}` first, or use --backend ort"
        )
    opened = open_artifacts(artifacts)  # one-line error for a missing or damaged folder
    folder = opened.folder.resolve()
    platform = engines_platform(folder) if backend != "ort" else None
    config = render_config(
        name=name,
        artifacts=folder,
        backend=backend,
        batch_size=opened.shapes.batch_size,
        height=opened.shapes.height,
        width=opened.shapes.width,
        kind=instance_kind(device, backend, folder),
        instances=instances,
        max_queue=max_queue,
        timeout_s=timeout_s,
        max_images=max_images,
        platform=platform,
        reference_images=opened.shapes.reference_images,
    )
    repository = Path(repository).expanduser()
    if repository.exists() and not repository.is_dir():
        raise UsageError(f"--repository {repository} is a file; pass a folder")
    repository.mkdir(parents=True, exist_ok=True)
    target = repository / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=repository))
    try:
        (staging / "1").mkdir()
        (staging / "config.pbtxt").write_text(config, encoding="utf-8")
        shutil.copyfile(MODEL_TEMPLATE, staging / "1" / "model.py")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=repository))
            os.replace(target, old / name)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def main(argv=None) -> int:
    parser = OneLineParser(
        prog="python -m deploy.triton", description="Write a Triton model repository that serves an artifacts folder."
    )
    parser.add_argument("--artifacts", required=True, type=Path, help="folder written by `python -m export`")
    parser.add_argument("--repository", required=True, type=Path, help="model repository to write into")
    parser.add_argument("--name", default="flux2", help="model name (default flux2)")
    parser.add_argument("--backend", default="auto", help="auto | trt | ort (default auto)")
    parser.add_argument("--device", default="auto", help="auto | gpu | cpu: instance kind (auto: gpu with engines)")
    parser.add_argument("--instances", type=int, default=1, help="model instances (engines loaded once each)")
    parser.add_argument("--max-queue", type=int, default=16, help="requests waiting before 503 (default 16)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="seconds in the queue before 503 (default 300)")
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, help="images per request at most")
    args = parser.parse_args(argv)
    target = write_repository(
        artifacts=args.artifacts,
        repository=args.repository,
        name=args.name,
        backend=args.backend,
        device=args.device,
        instances=args.instances,
        max_queue=args.max_queue,
        timeout_s=args.timeout_s,
        max_images=args.max_images,
    )
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
