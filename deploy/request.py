"""One generation request as the server sees it: typed values, checked, with a reason a client can act on.

No Triton here, so the rules are unit-tested without a server and the model (`deploy/model.py`)
only moves values between Triton tensors and these functions. The seed range and the reference-image
count are the runtime's own rules (`runtime.pipeline.check_seed`, `runtime.reference_images.check_count`),
worded for a client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# runtime.generate's defaults (Flux2Pipeline's), so a request without them draws what the CLI draws.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 4.0
MAX_STEPS = 100
DEFAULT_MAX_IMAGES = 4
# Bytes a prompt may carry, checked before the tokenizer sees it: a 5 MB prompt took 5.6 s to count
# while the only instance waited. 64 KiB is 32 times what FLUX.2's 512 tokens hold in English text
# (~4 bytes a token), so a prompt that fits the graphs is not refused by it.
DEFAULT_MAX_PROMPT_BYTES = 65536


# A request's `cache_threshold` at most: past ~1.5 the tiny models skip nearly every step already
# (bench/results/cache.json), and FBCache's published settings are 0.05-0.6.
MAX_CACHE_THRESHOLD = 10.0


class BadRequest(ValueError):
    """A request the client must change: answered with Triton's INVALID_ARG (HTTP 400), one line."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    num_images: int = 1
    loras: tuple[tuple[str, float], ...] = ()  # (name, scale): files of the model's --lora-dir (deploy.loras)
    size: tuple[int, int] | None = None  # (height, width): one of the artifacts' exported sizes; None: the first
    cache_threshold: float = 0.0  # the first-block step cache (docs/cache.md); 0: off


LORAS_FORM = "send NAME or NAME:SCALE, comma-separated, e.g. 'style:0.8,detail'"


def parse_loras(text: str) -> tuple[tuple[str, float], ...]:
    """The `loras` input, 'name[:scale],name2[:scale]' -> ((name, scale), ...); '' is none. Names are checked later.

    A name is a file stem of the model's --lora-dir; it cannot hold ',' or ':'. Scale 1.0 by default, as
    runtime.generate's --lora FILE[:SCALE].
    """
    wanted: dict[str, float] = {}
    items = [item.strip() for item in text.split(",")] if text.strip() else []
    for item in items:
        name, sep, tail = item.partition(":")
        name = name.strip()
        if not name:
            raise BadRequest(f"loras {_shown(text)} has an empty LoRA name; {LORAS_FORM}")
        scale = 1.0
        if sep:
            try:
                scale = float(tail)
            except ValueError:
                raise BadRequest(f"loras {_shown(item)}: scale {_shown(tail)} is not a number; {LORAS_FORM}") from None
            if not math.isfinite(scale):
                raise BadRequest(f"loras {_shown(item)}: scale {scale} is not a finite number; {LORAS_FORM}")
        if name in wanted:
            raise BadRequest(f"loras {_shown(text)} names {name!r} twice; name each LoRA once, with one scale")
        wanted[name] = scale
    return tuple(wanted.items())


def loras_text(loras: tuple[tuple[str, float], ...]) -> str:
    """The inverse of parse_loras: what a client sends for (name, scale) pairs (repr: the float, bit for bit)."""
    return ",".join(f"{name}:{scale!r}" for name, scale in loras)


def sizes_text(sizes) -> str:
    """Exported (height, width) sizes as a request names them: '128x128, 96x160' (height x width)."""
    return ", ".join(f"{height}x{width}" for height, width in sizes)


def parse_size(values: dict, sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The `height` and `width` inputs -> one of `sizes` (the artifacts' exported sizes, the default first).

    Both or neither: a lone height or width is refused rather than paired with the default's other side,
    which could draw a size the client did not mean. The graphs exist for the exported sizes only
    (`export --resolutions`), so any other is refused, naming them.
    """
    height, width = _integer(values, "height", None), _integer(values, "width", None)
    default = sizes_text(sizes[:1])
    allowed = f"this model draws {sizes_text(sizes)} (height x width); send one of them, or neither for {default}"
    if height is None and width is None:
        return sizes[0]
    if height is None or width is None:
        given = f"height {height}" if width is None else f"width {width}"
        raise BadRequest(f"{given} without {'width' if width is None else 'height'}: send both; {allowed}")
    if (height, width) not in sizes:
        raise BadRequest(f"height {height} width {width} ({height}x{width}) was not exported; {allowed}")
    return height, width


def _text(name: str, value, max_bytes: int) -> str:
    """A BYTES input as text, its size checked first (a str counts its UTF-8 bytes)."""
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
    if len(data) > max_bytes:
        raise BadRequest(
            f"{name} is {len(data)} bytes, past this model's limit of {max_bytes} bytes; shorten it "
            f"(the server's operator sets the limit: python -m deploy.triton --max-prompt-bytes N)"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start}); send UTF-8 text") from None


def _integer(values: dict, name: str, default: int | None) -> int | None:
    """An integer input; a value that is not an integer (text, NaN, 2.5, an overflow) is a BadRequest naming it."""
    value = values.get(name)
    if value is None:
        return default
    try:
        number = int(value)
        exact = number == value or isinstance(value, (str, bytes))
    except (TypeError, ValueError, OverflowError):
        exact = False
    if not exact:
        raise BadRequest(f"{name} {_shown(value)} is not an integer; send a whole number")
    return number


def _real(values: dict, name: str, default: float) -> float:
    """A float input; text that is not a number is a BadRequest naming it (range rules come after)."""
    value = values.get(name)
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"{name} {_shown(value)} is not a number; send a finite number") from None


def _shown(value) -> str:
    text = repr(value.decode("utf-8", "replace") if isinstance(value, bytes) else value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_request(
    values: dict,
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    prompt_length=None,
    max_tokens: int | None = None,
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
    sizes: tuple[tuple[int, int], ...] | None = None,
    cache_default: float | None = None,
) -> GenerationRequest:
    """Named scalars (None for an input the client left out) -> a checked GenerationRequest.

    `prompt_length(text) -> int` counts the formatted prompt's tokens before truncation: the
    exported graphs hold `max_tokens`, and a server refuses a prompt it would silently cut. Each
    text's size is checked against `max_prompt_bytes` before that, so the tokenizer never sees a
    prompt past it. With `sizes` (the exported (height, width), the default first) the `height` and
    `width` inputs are read into `size` (`parse_size`); without, they are left unread.
    `cache_default` is the model's `cache_threshold` for a request that sends none; None: the model cannot
    run the step cache (no step-cache graphs, or a backend that does not run graphs), and any
    `cache_threshold` above 0 is refused.
    """
    from runtime.pipeline import check_seed

    if values.get("prompt") is None:
        raise BadRequest("missing input 'prompt'; send the prompt as a BYTES tensor of shape [1, 1]")
    prompt = _text("prompt", values["prompt"], max_prompt_bytes)
    negative = values.get("negative_prompt")
    negative_prompt = "" if negative is None else _text("negative_prompt", negative, max_prompt_bytes)
    seed = _integer(values, "seed", 0)
    steps = _integer(values, "steps", DEFAULT_STEPS)
    guidance = _real(values, "guidance", DEFAULT_GUIDANCE)
    num_images = _integer(values, "num_images", 1)
    loras = () if values.get("loras") is None else parse_loras(_text("loras", values["loras"], max_prompt_bytes))
    size = None if sizes is None else parse_size(values, sizes)
    cache_threshold = _cache_threshold(values, cache_default)
    if not 1 <= steps <= MAX_STEPS:
        raise BadRequest(f"steps {steps} is outside 1..{MAX_STEPS}; FLUX.2 [dev] uses 50, distilled models about 4")
    if not math.isfinite(guidance) or guidance < 0:
        raise BadRequest(f"guidance {guidance} must be a finite number >= 0 (FLUX.2 [dev] uses 4.0)")
    check_seed(seed, "seed", BadRequest)
    if not 1 <= num_images <= max_images:
        raise BadRequest(f"num_images {num_images} is outside 1..{max_images} (this model's max_images parameter)")
    if prompt_length is not None and max_tokens is not None:
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            length = prompt_length(text)
            if length > max_tokens:
                raise BadRequest(
                    f"{name} is {length} tokens once formatted, past the {max_tokens} the artifacts were exported "
                    f"for; shorten it or export with a larger --max-sequence-length"
                )
    return GenerationRequest(prompt, negative_prompt, seed, steps, guidance, num_images, loras, size, cache_threshold)


def _cache_threshold(values: dict, default: float | None) -> float:
    threshold = _real(values, "cache_threshold", default or 0.0)
    if not math.isfinite(threshold) or not 0 <= threshold <= MAX_CACHE_THRESHOLD:
        raise BadRequest(
            f"cache_threshold {threshold} must be a finite number in 0..{MAX_CACHE_THRESHOLD:g} "
            "(0: no step cache; 0.05-0.6 skip more steps as it grows)"
        )
    if threshold and default is None:
        raise BadRequest(
            "cache_threshold: this model cannot run the step cache (its artifacts were exported without "
            "--step-cache, or its backend runs diffusers' modules); send 0 or none"
        )
    return threshold


def sidecar(request: GenerationRequest, image_index: int, *, runtime, backend: str, artifacts, timings) -> dict:
    """The JSON sidecar runtime.generate writes beside each PNG, for one image of this request."""
    cfg = runtime.uses_cfg(request.guidance)
    return {
        "prompt": request.prompt,
        **runtime.prompt_fit(request.prompt),  # never truncated here: parse_request refuses what would be
        "seed": request.seed,
        "image_index": image_index,
        "steps": request.steps,
        "guidance": request.guidance,
        "classifier_free_guidance": cfg,
        "negative_prompt": request.negative_prompt if cfg else None,
        "backend": backend,
        "precision": artifacts.precision,
        "height": artifacts.shapes.height,
        "width": artifacts.shapes.width,
        # The LoRAs drawn with, as runtime.generate records its --lora files (runtime.use_loras set them).
        **({"loras": [lora.record(scale) for lora, scale in runtime.loras]} if runtime.loras else {}),
        "artifacts": str(artifacts.folder.resolve()),
        "manifest_sha256": artifacts.manifest_sha256,
        # As runtime.generate records it: the threshold, and how many transformer evaluations skipped the tail.
        **({"cache": timings.cache} if getattr(timings, "cache", None) else {}),
        "timings": timings.as_dict(),
    }


def _server_words():
    """The reference-count refusal as a client reads it (runtime.generate's names --image and re-export)."""
    from runtime.reference_images import CountWords

    return CountWords(
        "reference image(s) sent", "this model takes exactly", "send {expected}", "serve artifacts exported with"
    )


def decode_references(blobs, *, count: int, size: tuple[int, int], multiple_of: int, log=None):
    """The `reference_images` input (encoded files, one per reference) -> [K, 3, H, W] as runtime.generate's --image.

    The bytes are read and fitted by runtime.reference_images, the code runtime.generate runs on the files.
    """
    from common.errors import UsageError
    from runtime.reference_images import check_count, decode_image, prepare_references

    if blobs is None:
        raise BadRequest(
            f"missing input 'reference_images'; this model was exported with --reference-images {count}: "
            f"send {count} encoded image file(s) (PNG, JPEG, ...) as a BYTES tensor of shape [1, {count}]"
        )
    check_count(len(blobs), count, _server_words(), BadRequest)
    names = [f"reference_images[{index}]" for index in range(count)]
    try:
        images = [decode_image(bytes(blob), name) for name, blob in zip(names, blobs, strict=True)]
    except UsageError as exc:
        raise BadRequest(str(exc).replace("pass an image file", "send an encoded image file")) from None
    array, _ = prepare_references(images, names, size=size, multiple_of=multiple_of, log=log)
    return array
