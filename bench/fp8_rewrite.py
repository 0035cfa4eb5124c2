"""make bench-fp8-rewrite: bytes, time and peak anonymous memory of the FP8 rewrite and its fp32 twin.

Input: a bf16 transformer graph as `python -m export` writes it (by default the tiny checkpoint at
256 x 256, 64 tokens, exported once into bench/results/fp8_rewrite/). Each step runs in its own
process: `quantize_graph` (NVIDIA's default exclusions, a synthetic amax per linear input derived
from the module path, so every run gets the same scales), then `fp32_twin` of its result. This
process samples the child's /proc status every few milliseconds (outside the child, so a long call
that holds the child's GIL is still seen): peak RssAnon, i.e. what the step holds in memory itself
(memory-mapped weights are file pages and not counted), minus the child's RssAnon once its imports
are done. Output: the sha256 of the written .onnx and .onnx.data (so two versions of the code can
be compared byte for byte), seconds, and memory, as a table and JSON (default
bench/results/fp8_rewrite.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MiB = 2**20
SAMPLE_SECONDS = 0.002
MODULE_PREFIX = "model."
READY = "ready"


class SyntheticAmax(dict):
    """Every module path has an amax in [0.5, 32): fixed per path, spread like calibrated activations."""

    def __contains__(self, path) -> bool:
        return True

    def __missing__(self, path: str) -> float:
        return 0.5 * 2 ** ((zlib.crc32(path.encode()) % 600) / 100)


def _anon_kib(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass  # the process ended
    return 0


def child(step: str, source: Path, target: Path) -> None:
    """Run one step; print the RssAnon after imports, then a JSON line with the step's own facts."""
    from common.cpu_twin import fp32_twin
    from export.fp8.rewrite import DEFAULT_TRANSFORMER_EXCLUDE, quantize_graph

    target.parent.mkdir(parents=True, exist_ok=True)
    before = _anon_kib()
    print(READY, before, flush=True)
    started = time.perf_counter()
    if step == "quantize":
        quantize_graph(
            source, target, input_amax=SyntheticAmax(), exclude=DEFAULT_TRANSFORMER_EXCLUDE, module_prefix=MODULE_PREFIX
        )
    else:
        fp32_twin(source, target)
    print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(16 * MiB):
            digest.update(block)
    return digest.hexdigest()


def measure(step: str, source: Path, target: Path) -> dict:
    command = [sys.executable, "-m", "bench.fp8_rewrite", "--child", step, str(source), str(target)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_kib(process.pid))
            done.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = process.stdout.read().splitlines()
    done.set()
    sampler.join()
    if process.wait() != 0:
        raise SystemExit(f"{step} of {source} failed (exit {process.returncode})")
    before = int(next(line for line in lines if line.startswith(READY)).split()[1])
    facts = json.loads(lines[-1])
    files = {name: target.parent / name for name in (target.name, target.name + ".data")}
    return {
        "step": step,
        "source": str(source),
        "seconds": round(facts["seconds"], 3),
        "anon_after_imports_mib": round(before / 1024, 1),
        "peak_anon_mib": round(peak[0] / 1024, 1),
        "step_anon_mib": round((peak[0] - before) / 1024, 1),
        "bytes": {name: path.stat().st_size for name, path in files.items() if path.exists()},
        "sha256": {name: _sha256(path) for name, path in files.items() if path.exists()},
    }


def _node_facts(node) -> tuple:
    import onnx

    attributes = sorted((a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute)
    attributes = [(name, value.SerializeToString() if hasattr(value, "SerializeToString") else value)
                  for name, value in attributes]  # fmt: skip
    metadata = sorted((p.key, p.value) for p in node.metadata_props)
    return node.op_type, node.domain, node.name, list(node.input), list(node.output), attributes, metadata


def _value_facts(values) -> dict:
    return {v.name: v.type.SerializeToString(deterministic=True) for v in values}


def equivalence(a: Path, b: Path) -> dict:
    """What differs between two graphs, apart from where their external data sits in the file."""
    import onnx
    from onnx import numpy_helper

    first, second = (onnx.load(str(path), load_external_data=False) for path in (a, b))
    external = [sum(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
                for model in (first, second)]  # fmt: skip
    for model, path in ((first, a), (second, b)):
        onnx.load_external_data_for_model(model, str(path.parent))
    differences = []
    for field in ("ir_version", "producer_name", "producer_version", "opset_import", "metadata_props"):
        if getattr(first, field) != getattr(second, field):
            differences.append(f"model.{field}")
    nodes = [[_node_facts(n) for n in model.graph.node] for model in (first, second)]
    if nodes[0] != nodes[1]:
        at = next((i for i, (x, y) in enumerate(zip(*nodes)) if x != y), min(map(len, nodes)))
        differences.append(f"nodes differ from index {at} ({len(nodes[0])} vs {len(nodes[1])} nodes)")
    for field in ("input", "output"):
        if _value_facts(getattr(first.graph, field)) != _value_facts(getattr(second.graph, field)):
            differences.append(f"graph.{field}")
    info = [_value_facts(model.graph.value_info) for model in (first, second)]
    if info[0] != info[1]:
        changed = sum(info[0][k] != info[1][k] for k in info[0].keys() & info[1].keys())
        for mine, other, model, label in ((0, 1, first, "first"), (1, 0, second, "second")):
            only = info[mine].keys() - info[other].keys()
            names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
            stale = len(only - names)
            differences.append(f"value_info: {len(only)} names in the {label} graph only ({stale} name no value there)")
        differences.append(f"value_info: {changed} names typed differently")
    tensors = [{t.name: t for t in model.graph.initializer} for model in (first, second)]
    if tensors[0].keys() != tensors[1].keys():
        differences.append("initializer names")
    for name in tensors[0].keys() & tensors[1].keys():
        x, y = tensors[0][name], tensors[1][name]
        if x.data_type != y.data_type or list(x.dims) != list(y.dims):
            differences.append(f"initializer {name}: type or shape")
        elif numpy_helper.to_array(x).tobytes() != numpy_helper.to_array(y).tobytes():
            differences.append(f"initializer {name}: values")
    order = [[t.name for t in model.graph.initializer] for model in (first, second)]
    return {
        "differences": differences,
        "nodes": len(nodes[0]),
        "initializers": len(tensors[0]),
        "initializer_order_equal": order[0] == order[1],
        "external_initializers": external,
    }


def ort_outputs_equal(a: Path, b: Path, seed: int = 0) -> bool:
    """Both graphs in ONNX Runtime's CPU provider on the same random feeds: bit-identical outputs?"""
    import numpy as np

    from export.fp8.twin import ort_session

    sessions = [ort_session(path) for path in (a, b)]
    generator = np.random.default_rng(seed)
    feeds = {i.name: generator.standard_normal(i.shape).astype(np.float32) for i in sessions[0].get_inputs()}
    results = [session.run(None, feeds) for session in sessions]
    return all(x.tobytes() == y.tobytes() for x, y in zip(*results, strict=True))


def default_source(folder: Path) -> Path:
    """The tiny checkpoint's transformer at bf16, 256 x 256, 64 tokens (exported once, then reused)."""
    graph = folder / "bf16" / "transformer.onnx"
    if not graph.exists():
        command = [sys.executable, "-m", "export", "--model", "tiny", "--precision", "bf16", "--components",
                   "transformer", "--out", str(folder / "bf16"), "--height", "256", "--width", "256",
                   "--max-sequence-length", "64", "--skip-check"]  # fmt: skip
        subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    return graph


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, action="append", help="bf16 transformer .onnx (repeatable)")
    parser.add_argument("--work", type=Path, default=RESULTS / "fp8_rewrite", help="folder for the written graphs")
    parser.add_argument("--json", type=Path, default=RESULTS / "fp8_rewrite.json")
    parser.add_argument(
        "--compare", type=Path, metavar="DIR", help="a --work folder of an earlier run: compare every graph with it"
    )
    parser.add_argument("--child", nargs=3, metavar=("STEP", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        step, source, target = args.child
        child(step, Path(source), Path(target))
        return 0

    sources = args.source or [default_source(args.work)]
    rows = []
    for index, source in enumerate(sources):
        out = args.work / f"run{index}"
        shutil.rmtree(out, ignore_errors=True)
        fp8 = out / "fp8" / source.name
        rows.append(measure("quantize", source.resolve(), fp8))
        rows.append(measure("fp32_twin", fp8, out / "twin" / source.name))
    print(f"{'step':<10} {'source':<40} {'seconds':>8} {'anon MiB':>9} {'sha256 .onnx / .data':<30}")
    for row in rows:
        digests = " / ".join(digest[:12] for digest in row["sha256"].values())
        print(
            f"{row['step']:<10} {row['source'][-40:]:<40} {row['seconds']:>8.2f} {row['step_anon_mib']:>9.1f} {digests}"
        )
    if args.compare:
        for index, _ in enumerate(sources):
            for step in ("fp8", "twin"):
                name = sources[index].name
                mine, theirs = args.work / f"run{index}" / step / name, args.compare / f"run{index}" / step / name
                report = equivalence(theirs, mine)
                if step == "twin":
                    report["ort_outputs_bit_identical"] = ort_outputs_equal(theirs, mine)
                print(f"run{index} {step}: {json.dumps(report)}")
                rows.append({"compare": str(theirs), "with": str(mine), **report})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
