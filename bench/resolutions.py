"""make bench-resolutions: the disk that several image sizes cost, on the full-width FLUX.2 [dev] slice.

The 1+1-block slice of `bench.export_memory` (FLUX.2 [dev]'s real widths, 4.3 GiB of bf16
transformer) is exported at bf16, transformer and VAE (`--skip-check`: the numerics of each size are
the suite's subject, `tests/test_resolutions.py`), once at 1024x1024 and once at the five usual
buckets (1024x1024, 1152x896, 896x1152, 1344x768, 768x1344). Reported: the bytes of each folder's
graphs, their ratio (goal <= 1.02), what each further size holds of its own, the export times, and
by arithmetic what the real 8+48-block transformer would hold per further size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from bench.export_memory import GiB, ensure_slice

REPO = Path(__file__).resolve().parent.parent
BUCKETS = ((1024, 1024), (1152, 896), (896, 1152), (1344, 768), (768, 1344))


def _graph_bytes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.name.startswith(("transformer", "vae"))}


def _export(checkpoint: Path, out: Path, sizes) -> float:
    from common.specs import Shapes
    from export.run import export_artifacts

    shutil.rmtree(out, ignore_errors=True)
    (height, width) = sizes[0]
    shapes = Shapes(height, width, 512, resolutions=tuple(sizes) if len(sizes) > 1 else ())
    started = time.perf_counter()
    export_artifacts(
        model=str(checkpoint),
        out=out,
        precision="bf16",
        components=("transformer", "vae"),
        shapes=shapes,
        skip_check=True,
        log=lambda m: None,
    )
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "flux2-trt" / "bench")
    parser.add_argument("--work", type=Path, default=REPO / "artifacts" / "bench-resolutions")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "resolutions.json")
    args = parser.parse_args(argv)
    checkpoint = ensure_slice(args.cache, 1, 1, print)
    one_s = _export(checkpoint, args.work / "one", BUCKETS[:1])
    one = _graph_bytes(args.work / "one")
    five_s = _export(checkpoint, args.work / "five", BUCKETS)
    five = _graph_bytes(args.work / "five")
    report = json.loads((args.work / "five" / "reports" / "export_check.json").read_text())["components"]
    further = {name: entry["shared_weights"] for name, entry in report.items() if "shared_weights" in entry}
    own_files = {name: size for name, size in five.items() if name not in one}
    result = {
        "checkpoint": str(checkpoint),
        "precision": "bf16",
        "sizes": [list(size) for size in BUCKETS],
        "one_size_bytes": sum(one.values()),
        "five_sizes_bytes": sum(five.values()),
        "ratio": sum(five.values()) / sum(one.values()),
        "further_size_files": own_files,
        "further_size_sharing": further,
        "export_seconds": {"one": round(one_s, 1), "five": round(five_s, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"1 size: {result['one_size_bytes'] / GiB:.3f} GiB in {one_s:.0f} s; 5 sizes: "
        f"{result['five_sizes_bytes'] / GiB:.3f} GiB in {five_s:.0f} s; ratio {result['ratio']:.4f}"
    )
    for name, size in sorted(own_files.items()):
        print(f"  {name}: {size / 2**20:.2f} MiB")
    print(f"wrote {args.out}")
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
