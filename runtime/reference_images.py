"""Reference images for editing: files -> [K, 3, H, W] float32 in [-1, 1], prepared as diffusers prepares them.

diffusers 0.42's Flux2Pipeline / Flux2KleinPipeline take each reference image (a PIL image, as
`diffusers.utils.load_image` gives it: EXIF orientation applied, RGB) and:
1. above 1024 x 1024 pixels of area, resize it to that area (LANCZOS, sides truncated to ints);
2. floor each side to a multiple of 16 and center-crop to it (Flux2ImageProcessor's
   `resize_mode="crop"` crops without resizing);
3. scale to [0, 1] (`/ 255` in float32), then to [-1, 1] (`2x - 1`).

The artifacts are built for one reference size. An image whose steps 1-2 land on that size is
prepared exactly as above. Any other image is first fitted to the exported size as diffusers'
`VaeImageProcessor.resize(..., resize_mode="crop")` fits one (resize, LANCZOS, keeping the aspect
ratio so that the image covers the size, then center-crop), and the caller is told so; diffusers
given the fitted image computes the same as this runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UsageError

MAX_AREA = 1024 * 1024  # Flux2Pipeline's reference area limit
MULTIPLE_OF = 16  # vae_scale_factor * 2 for FLUX.2's 8x VAE (`Geometry.pixels_per_token`)


@dataclass(frozen=True)
class PreparedReference:
    path: Path | str  # the file, or the name a server gave the bytes
    image: object  # PIL.Image.Image at the exported size, RGB: what diffusers is given in runtime.check
    original_size: tuple[int, int]  # (height, width) of the file
    fitted: bool  # True when resized/cropped to the exported size beyond what diffusers itself does


def load_image(path: Path):
    """The file as diffusers.utils.load_image reads it (EXIF orientation applied, RGB), or a one-line error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"--image {path} does not exist; pass an image file (PNG, JPEG, WebP, ...)")
    return _read_image(path, f"--image {path}")


def decode_image(data: bytes, label: str):
    """Encoded image bytes (a file's content, as a server receives it) read exactly as load_image reads the file."""
    import io

    return _read_image(io.BytesIO(data), label)


def _read_image(source, label: str):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(source) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = "not an image PIL can read" if isinstance(exc, UnidentifiedImageError) else f"unreadable ({exc})"
        raise UsageError(f"{label} is {reason}; pass an image file (PNG, JPEG, WebP, ...)") from None


def diffusers_size(width: int, height: int) -> tuple[int, int, bool]:
    """(width, height) after step 1, and whether step 1 resized: Flux2Pipeline's area limit."""
    if width * height <= MAX_AREA:
        return width, height, False
    scale = math.sqrt(MAX_AREA / (width * height))
    return int(width * scale), int(height * scale), True


def center_crop(image, width: int, height: int):
    """Flux2ImageProcessor._resize_and_crop: a center crop, no resize."""
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def fit_to(image, width: int, height: int):
    """VaeImageProcessor._resize_and_crop: resize (LANCZOS) to cover width x height keeping the aspect ratio, center it."""
    from PIL import Image

    ratio = width / height
    source_ratio = image.width / image.height
    resized_width = width if ratio > source_ratio else image.width * height // image.height
    resized_height = height if ratio <= source_ratio else image.height * width // image.width
    resized = image.resize((resized_width, resized_height), resample=Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(resized, box=(width // 2 - resized_width // 2, height // 2 - resized_height // 2))
    return canvas


def prepare(image, size: tuple[int, int], multiple_of: int = MULTIPLE_OF):
    """(PIL image at `size` = (height, width), fitted?) for one loaded image."""
    from PIL import Image

    height, width = size
    target_width, target_height, scaled = diffusers_size(image.width, image.height)
    if (target_height // multiple_of * multiple_of, target_width // multiple_of * multiple_of) == (height, width):
        if scaled:
            image = image.resize((target_width, target_height), Image.Resampling.LANCZOS)
        return center_crop(image, width, height), False
    return fit_to(image, width, height), True


def to_array(images) -> np.ndarray:
    """PIL RGB images -> [K, 3, H, W] float32 in [-1, 1], as VaeImageProcessor.preprocess (pil_to_numpy, normalize)."""
    arrays = [np.array(image).astype(np.float32) / 255.0 for image in images]
    return np.stack(arrays).transpose(0, 3, 1, 2) * 2.0 - 1.0


@dataclass(frozen=True)
class CountWords:
    """How one caller's user names the reference images and the fixes; the rule itself is one (`check_count`)."""

    given: str  # "--image files given"
    takes: str  # "these artifacts take"
    supply: str  # "pass {expected}"
    reexport: str  # "re-export with"


COMMAND_LINE = CountWords("--image files given", "these artifacts take", "pass {expected}", "re-export with")


def check_count(given: int, expected: int, words: CountWords = COMMAND_LINE, error: type = UsageError) -> None:
    """Exactly the number of reference images the artifacts were exported with (their shapes are fixed)."""
    if given != expected:
        raise error(
            f"{given} {words.given}, but {words.takes} {expected} reference image(s) (shapes are fixed at export); "
            f"{words.supply.format(expected=expected)}, or {words.reexport} --reference-images {given}"
        )


def load_references(
    paths, *, count: int, size: tuple[int, int], multiple_of: int = MULTIPLE_OF, log=None
) -> tuple[np.ndarray, list]:
    """Check the number against what the artifacts take, load, prepare; ([K, 3, H, W] array, PreparedReference list)."""
    paths = [Path(p) for p in paths]
    check_count(len(paths), count)
    return prepare_references(
        [load_image(path) for path in paths], paths, size=size, multiple_of=multiple_of, log=log, label="--image {}"
    )


def references_for(artifacts, paths, log=None) -> tuple[np.ndarray | None, list]:
    """`load_references` for an opened artifacts folder (`runtime.artifacts.Artifacts`); (None, []) when it takes none."""
    shapes = artifacts.shapes
    if not paths and not shapes.reference_images:
        return None, []
    return load_references(
        paths,
        count=shapes.reference_images,
        size=shapes.reference_size,
        multiple_of=artifacts.geometry.pixels_per_token,
        log=log,
    )


def prepare_references(
    images, names, *, size: tuple[int, int], multiple_of: int = MULTIPLE_OF, log=None, label: str = "{}"
) -> tuple[np.ndarray, list]:
    """Loaded images (load_image, decode_image) -> ([K, 3, H, W] array, PreparedReference list); `label` names one."""
    prepared = []
    for name, image in zip(names, images, strict=True):
        fitted_image, fitted = prepare(image, size, multiple_of)
        prepared.append(PreparedReference(name, fitted_image, (image.height, image.width), fitted))
        if fitted and log is not None:
            natural_width, natural_height, _ = diffusers_size(image.width, image.height)
            natural = f"{natural_height // multiple_of * multiple_of}x{natural_width // multiple_of * multiple_of}"
            log(
                f"note: {label.format(name)} is {image.height}x{image.width} (HxW); resized and center-cropped to the "
                f"exported reference size {size[0]}x{size[1]} (diffusers would use {natural}: "
                f"export with --reference-size {natural} for that)"
            )
    return to_array([p.image for p in prepared]), prepared
