"""Triton Python-backend model: one FLUX.2 pipeline per artifacts folder (copied to REPO/<name>/1/model.py).

Settings come from config.pbtxt's `parameters` (written by `python -m deploy.triton`), so this
file is the same for every repository. The denoising loop stays in flux2-trt's runtime (latents on
the device, the trt backend's CUDA graphs); this class only turns Triton requests into runtime
calls and answers:

- a bad request: TritonError INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT) with one line;
- a failure inside generation: TritonError INTERNAL (HTTP 500) for that request only;
- a request the client cancelled (gRPC): checked between denoising steps, answered CANCELLED;
- a request of a batch whose queue timeout passed before the model reached it: UNAVAILABLE (503).

Triton hands the instance several waiting requests at once (max_batch_size, deploy/triton.py
rows_per_execute); each is answered through its response sender as soon as it is drawn.

A folder exported at several sizes (`export --resolutions`) is served at each: a request's `height`
and `width` pick one (neither: the first). Every size's runtime is opened at load, one text encoder
shared by all (deploy/sizes.py), and each draws its warm-up image before the model is ready.

The model becomes ready (and so the server's /v2/health/ready) only after the engines are loaded
and one warm-up image is drawn from a request's values, parsed and tokenized as a request's are.
Artifacts whose chat template alone fills their max_sequence_length never load: they would refuse
every prompt (`Artifacts.check_prompt_room`, deploy.triton's reason).
"""

from __future__ import annotations

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

STAGES = ("tokenize", "text_encoder", "denoise", "vae")
INPUTS = (
    "prompt", "negative_prompt", "seed", "steps", "guidance", "num_images", "loras", "height", "width", "cache_threshold",
)  # fmt: skip


# One letter: any model with room for one prompt token beyond its chat template warms up
# (Artifacts.check_prompt_room refuses the others first, with the reason deploy.triton gives).
WARM_UP_PROMPT = "a"


def _parameter(config: dict, key: str, default: str | None = None) -> str | None:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


def _sampling(wanted):
    """runtime.pipeline.Sampling for a checked deploy.request.GenerationRequest."""
    from runtime.pipeline import Sampling

    return Sampling(
        wanted.prompt,
        wanted.seed,
        wanted.steps,
        wanted.guidance,
        wanted.num_images,
        wanted.negative_prompt,
        cache_threshold=wanted.cache_threshold,
    )


class TritonPythonModel:
    lora_folder = None  # deploy.loras.LoraFolder where the config names a lora_dir (deploy.triton --lora-dir)
    cache_default = None  # a request's cache_threshold when it sends none; None: no step cache here (_cache_default)

    def initialize(self, args):
        from common.errors import Flux2TrtError
        from deploy.request import DEFAULT_MAX_PROMPT_BYTES, sizes_text
        from deploy.sizes import open_sizes
        from runtime.artifacts import open_artifacts
        from runtime.backends.select import SERVED, select_backend

        self.config = json.loads(args["model_config"])
        self.logger = pb_utils.Logger
        artifacts_folder = _parameter(self.config, "artifacts")
        backend_name = _parameter(self.config, "backend", "auto")
        self.max_images = int(_parameter(self.config, "max_images", "4"))
        # A repository written before the limit existed gets the default.
        self.max_prompt_bytes = int(_parameter(self.config, "max_prompt_bytes", str(DEFAULT_MAX_PROMPT_BYTES)))
        policy = self.config.get("dynamic_batching", {}).get("default_queue_policy", {})
        self.timeout_us = int(policy.get("default_timeout_microseconds", 0))
        if args.get("model_instance_kind") == "GPU":
            import torch

            torch.cuda.set_device(int(args["model_instance_device_id"]))
        try:
            self.artifacts = open_artifacts(artifacts_folder)
            # Before the engines load: such a model would refuse every prompt (deploy.triton's reason).
            self.artifacts.check_prompt_room()
            # (height, width) -> that size's Flux2Runtime, the default first; a backend per size (deploy/sizes.py)
            self.runtimes = open_sizes(
                self.artifacts,
                lambda view: select_backend(
                    backend_name,
                    view.folder,
                    view.manifest,
                    log=lambda message: self.logger.log_info(message),
                    policy=SERVED,
                ),
            )
            self.lora_folder = self._lora_folder(_parameter(self.config, "lora_dir"))
        except Flux2TrtError as exc:  # a one-line reason in the server log, and the model stays unloaded
            raise pb_utils.TritonModelException(f"flux2 model {args['model_name']}: {exc}") from None
        self.backend = self.runtimes[self.artifacts.shapes.sizes[0]].backend
        self.cache_default = self._cache_default(_parameter(self.config, "cache_threshold", "0"))
        self._define_metrics(args["model_name"], args["model_version"])
        started = time.perf_counter()
        self._warm_up(args["model_name"])
        self.logger.log_info(
            f"flux2 model {args['model_name']}: {self.artifacts.folder} on {self.backend.name} "
            f"({self.artifacts.precision}), warm-up image per size ({sizes_text(self.runtimes)}) "
            f"{time.perf_counter() - started:.2f} s"
        )

    def _cache_default(self, configured: str) -> float | None:
        """The `cache_threshold` of a request that sends none; None where this model cannot run the step cache."""
        from common.specs import STEP_CACHE_COMPONENTS

        has_graphs = all(name in self.artifacts.manifest.components for name in STEP_CACHE_COMPONENTS)
        if not has_graphs or not getattr(self.backend, "runs_graphs", True):
            return None
        return float(configured)

    def _lora_folder(self, lora_dir: str | None):
        """The --lora-dir files requests may name; None without one. Refused at load as deploy.triton refuses it."""
        from pathlib import Path

        from deploy.loras import LoraFolder
        from deploy.triton import check_lora_dir

        if lora_dir is None:
            return None
        folder = check_lora_dir(Path(lora_dir), self.artifacts.folder, self.artifacts.shapes)
        return LoraFolder(folder, artifacts_folder=self.artifacts.folder, shapes=self.artifacts.shapes)

    def _loras(self, wanted) -> tuple:
        """The request's `loras` read and checked against the slots ((Lora, scale) pairs); () when it names none."""
        from deploy.request import BadRequest

        if not wanted.loras:
            return ()
        if self.lora_folder is None:
            if not self.artifacts.shapes.lora_rank:
                raise BadRequest(
                    "loras: this model's artifacts have no LoRA slots (exported without --lora-rank); send no "
                    "loras, or serve artifacts exported with --lora-rank R and deploy.triton --lora-dir DIR"
                )
            raise BadRequest(
                "loras: this model serves no LoRAs (its repository was written without --lora-dir); send no "
                "loras, or write it with python -m deploy.triton --lora-dir DIR"
            )
        return self.lora_folder.open(wanted.loras)

    def _warm_up(self, model_name: str):
        """One one-step image per exported size from a request's values, through `parse_request` and the real
        tokenizer as `_answer` takes them: a prompt a request could not send fails the load (the model is not
        ready). Every size: its graphs are loaded (TensorRT: its engines, CUDA graphs captured) before the
        first request at it, and a size that cannot draw fails the load rather than its first request."""
        from deploy.request import BadRequest

        for height, width in self.runtimes:
            try:
                values = {"prompt": WARM_UP_PROMPT, "seed": 0, "steps": 1, "guidance": 1.0, "height": height}
                wanted = self._parse({**values, "width": width})
            except BadRequest as exc:
                raise pb_utils.TritonModelException(
                    f"flux2 model {model_name}: warm-up request refused: {exc}"
                ) from None
            runtime = self.runtimes[wanted.size]
            shapes = runtime.artifacts.shapes
            # Editing artifacts warm up on mid-grey references (the runtime takes exactly K).
            count = shapes.reference_images
            warm_references = np.zeros((count, 3, *shapes.reference_size), np.float32) if count else None
            for _ in runtime.generate(_sampling(wanted), progress=False, reference_images=warm_references):
                pass

    def _parse(self, values: dict):
        from deploy.request import parse_request

        shapes = self.artifacts.shapes
        return parse_request(
            values,
            max_images=self.max_images,
            # One folder, one tokenizer: the first size's runtime counts for every size.
            prompt_length=self.runtimes[shapes.sizes[0]].tokenizer.untruncated_length,
            max_tokens=shapes.max_sequence_length,
            max_prompt_bytes=self.max_prompt_bytes,
            sizes=shapes.sizes,
            cache_default=self.cache_default,
        )

    def _define_metrics(self, model: str, version: str):
        labels = {"model": model, "version": str(version)}
        images = pb_utils.MetricFamily(
            name="flux2_images_total", description="images drawn", kind=pb_utils.MetricFamily.COUNTER
        )
        seconds = pb_utils.MetricFamily(
            name="flux2_stage_seconds_total",
            description="seconds spent per pipeline stage (tokenize, text_encoder, denoise, vae)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        # Triton counts the timeouts of its own queue (nv_inference_request_failure{reason="REJECTED"});
        # this counts those the model answers for the requests its batch held (docs/serving.md, "Metrics").
        expired = pb_utils.MetricFamily(
            name="flux2_requests_expired_total",
            description="requests answered 503 by the model: their queue timeout passed while they waited in a batch",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.images_metric = images.Metric(labels=labels)
        self.stage_metrics = {stage: seconds.Metric(labels={**labels, "stage": stage}) for stage in STAGES}
        self.expired_metric = expired.Metric(labels=labels)
        self._families = (images, seconds, expired)  # the families must outlive their metrics

    def _values(self, request) -> dict:
        from deploy.request import BadRequest

        values = {}
        for name in INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                values[name] = None
                continue
            array = tensor.as_numpy()
            if array.shape[0] != 1:  # max_batch_size lets Triton batch requests, not a client send rows
                raise BadRequest(f"input {name!r} has {array.shape[0]} rows; send one row per request (shape [1, 1])")
            values[name] = array.reshape(-1)[0]
        return values

    def _references(self, request, artifacts):
        """The request's `reference_images` (encoded files) prepared as runtime.generate prepares --image for
        `artifacts` (the view of the request's size); None at K=0."""
        from deploy.request import decode_references

        shapes = artifacts.shapes
        if not shapes.reference_images:
            return None
        tensor = pb_utils.get_input_tensor_by_name(request, "reference_images")
        return decode_references(
            None if tensor is None else list(tensor.as_numpy().reshape(-1)),
            count=shapes.reference_images,
            size=shapes.reference_size,
            multiple_of=artifacts.geometry.pixels_per_token,
            log=lambda message: self.logger.log_info(message),
        )

    def execute(self, requests):
        started = time.monotonic()
        for request in requests:
            response = self._expired(request, time.monotonic() - started) or self._answer(request)
            request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return [None] * len(requests)  # every request was answered through its sender

    def _expired(self, request, waited_s: float):
        """Triton's queue timeout, held for the time a request waited behind the others of its batch."""
        timeout_us = self.timeout_us
        override_us = request.timeout()  # allow_timeout_override, as Triton's queue policy reads it
        if override_us and (not timeout_us or override_us < timeout_us):
            timeout_us = override_us
        if not timeout_us or waited_s * 1e6 <= timeout_us:
            return None
        self.expired_metric.increment(1)
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError("Request timeout expired", pb_utils.TritonError.UNAVAILABLE)
        )

    def _answer(self, request):
        from deploy.loras import same_loras
        from deploy.request import BadRequest, sidecar
        from runtime.pipeline import GenerationCancelled, to_uint8

        try:
            wanted = self._parse(self._values(request))
            # Each request is drawn at its own size, by that size's runtime: a batch may hold several sizes.
            runtime = self.runtimes[wanted.size]
            references = self._references(request, runtime.artifacts)
            loras = self._loras(wanted)
        except BadRequest as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        images, sidecars = [], []
        try:
            # Each request of a batch is its own runtime call, so each draws with its own set; a request
            # without `loras` gets none. Consecutive requests of one set keep the slots' feeds as they are.
            if not same_loras(loras, runtime.loras):
                runtime.use_loras(loras)
            for index, image, timings in runtime.generate(
                _sampling(wanted), progress=False, cancelled=request.is_cancelled, reference_images=references
            ):
                images.append(to_uint8(image))
                sidecars.append(
                    sidecar(
                        wanted,
                        index,
                        runtime=runtime,
                        backend=self.backend.name,
                        artifacts=runtime.artifacts,
                        timings=timings,
                    )
                )
                for stage in STAGES:
                    self.stage_metrics[stage].increment(float(timings.stages.get(stage, 0.0)))
                self.images_metric.increment(1)
        except GenerationCancelled as exc:
            self.logger.log_info(f"request {request.request_id() or '(no id)'} {exc}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.CANCELLED))
        except Exception as exc:  # noqa: BLE001 -- one request fails, the server keeps serving
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            self.logger.log_error(f"generation failed: {reason}")
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"generation failed: {reason}", pb_utils.TritonError.INTERNAL)
            )
        # Batch dimension first: the model declares max_batch_size, one request is one row.
        image = np.stack(images)[None]  # [1, K, H, W, 3] uint8
        text = np.array([[json.dumps(s).encode() for s in sidecars]], dtype=np.object_)  # [1, K]
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("image", image), pb_utils.Tensor("sidecar", text)]
        )

    def finalize(self):
        for runtime in getattr(self, "runtimes", {}).values():
            runtime.backend.close()  # a further size's closes its own backend; the first's, the shared one
