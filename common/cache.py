"""Where the project caches what it generates (tiny checkpoints, FP8 calibration): $FLUX2_TRT_CACHE."""

import os
from pathlib import Path


def default_cache_dir() -> Path:
    root = os.environ.get("FLUX2_TRT_CACHE") or os.path.join(Path.home(), ".cache", "flux2-trt")
    return Path(root)
