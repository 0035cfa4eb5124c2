"""Polygraphy's input and reference files for an artifacts folder, and the `polygraphy run` that uses them.

Per component of DIR's manifest it writes, into OUT:

  <component>.inputs.json      the export check's inputs (export.verify.reference.ReferenceInputs), as
                               Polygraphy's input format: a list of one feed dict (polygraphy.json);
  <component>.reference.json   PyTorch fp32's outputs on them, as Polygraphy RunResults (runner
                               "pytorch-fp32"), the reference the export check holds each graph to;

and prints the `polygraphy run` command that holds the graph to its precision's bounds
(common.precision): `--compare l2 cosine_similarity` with `--l2-threshold` = max rel L2 x the
reference's L2 norm (Polygraphy's L2 is absolute), `--cosine-similarity-threshold` = min cosine,
and `--validate` (no NaN/Inf): the three parts of `Tolerance.judge`. Graphs ONNX Runtime's CPU
provider runs (fp32, fp16) get `--onnxrt`; every component also gets the engine's command for a
GPU node (`--trt` on engines/rtx/<component>.plan), which needs a GPU and is not run here.

It sits outside the packages because Polygraphy is a development tool (the dev extra), not a
dependency of export, engines or the runtime. See docs/engines.md, "Polygraphy".
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.cli import OneLineParser, run_cli  # noqa: E402
from common.errors import UsageError  # noqa: E402

REFERENCE_RUNNER = "pytorch-fp32"
POLYGRAPHY = "polygraphy==0.53.6"  # the dev extra's pin; `--compare l2 cosine_similarity` needs a recent one


@dataclass(frozen=True)
class ComponentData:
    component: str
    onnx: Path
    inputs: Path
    reference: Path
    precision: str
    output: str
    max_rel_l2: float
    l2_threshold: float  # absolute: max rel L2 x the reference's L2 norm
    min_cosine: float
    onnxrt_runs: bool  # whether ONNX Runtime's CPU provider has kernels for this graph

    def compare_args(self) -> list[str]:
        return [
            "--load-inputs", str(self.inputs), "--load-outputs", str(self.reference),
            "--compare", "l2", "cosine_similarity",
            "--l2-threshold", f"{self.output}:{self.l2_threshold:.6g}",
            "--cosine-similarity-threshold", f"{self.output}:{self.min_cosine:g}",
            "--validate",
        ]  # fmt: skip

    def onnxrt_args(self) -> list[str]:
        """`polygraphy run` arguments: the ONNX graph in ONNX Runtime against PyTorch fp32."""
        return ["run", str(self.onnx), "--onnxrt", *self.compare_args()]

    def engine_args(self, plan: Path) -> list[str]:
        """`polygraphy run` arguments for the engine (with POLYGRAPHY_USE_TENSORRT_RTX=1, on a GPU node)."""
        return ["run", str(plan), "--model-type", "engine", "--trt", *self.compare_args()]


def write_polygraphy_data(*, artifacts: Path, out: Path, components=None, log=print) -> list[ComponentData]:
    """Write each component's inputs and PyTorch fp32 reference outputs in Polygraphy's formats into `out`."""
    import numpy as np
    import torch

    from common.atomic import atomic_write_via
    from common.manifest import read_manifest
    from common.precision import precision as declared
    from common.specs import component_specs
    from export.checkpoint import open_checkpoint
    from export.verify.reference import ReferenceInputs, build_graph_module

    try:
        from polygraphy.comparator import IterationResult, RunResults
        from polygraphy.json import save_json
        from polygraphy.logger import G_LOGGER
    except ImportError as exc:
        raise UsageError(
            f"polygraphy is not installed ({exc}): pip install {POLYGRAPHY} (the dev extra has it)"
        ) from None

    artifacts, out = Path(artifacts).absolute(), Path(out).absolute()
    manifest = read_manifest(artifacts)
    wanted = tuple(components or manifest.components)
    unknown = [c for c in wanted if c not in manifest.components]
    if unknown:
        raise UsageError(f"--component {', '.join(unknown)}: {artifacts} has {', '.join(manifest.components)}")
    checkpoint = open_checkpoint(manifest.source.checkpoint)  # the fp32 reference needs the checkpoint itself
    specs = component_specs(manifest.geometry, manifest.shapes)
    reference = ReferenceInputs(checkpoint, manifest.geometry, manifest.shapes)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for component in wanted:
        spec, entry = specs[component], manifest.components[component]
        module = build_graph_module(component, checkpoint, manifest.geometry, manifest.shapes, "fp32")
        if component == "text_encoder":
            reference.prompt_embeds(module)  # the transformer's inputs: computed once, from this module
        feeds = reference.feeds(spec)
        with torch.no_grad():
            expected = module(*[torch.from_numpy(feeds[t.name]) for t in spec.inputs]).numpy()
        del module
        output = spec.outputs[0].name
        inputs_path, reference_path = out / f"{component}.inputs.json", out / f"{component}.reference.json"
        results = RunResults([(REFERENCE_RUNNER, [IterationResult({output: expected}, runner_name=REFERENCE_RUNNER)])])
        with G_LOGGER.verbosity(G_LOGGER.WARNING):  # its "Saving ..." line would name the temporary file
            atomic_write_via(inputs_path, lambda path, feeds=feeds: save_json([feeds], str(path)))
            atomic_write_via(reference_path, lambda path, results=results: results.save(str(path)))
        graph_precision = declared(entry.precision)
        tolerance = graph_precision.tolerance
        norm = float(np.linalg.norm(expected.astype(np.float64)))
        data = ComponentData(
            component, artifacts / entry.file, inputs_path, reference_path, entry.precision, output,
            max_rel_l2=tolerance.max_rel_l2, l2_threshold=tolerance.max_rel_l2 * norm, min_cosine=tolerance.min_cosine,
            onnxrt_runs=graph_precision.ort_cpu_runs,
        )  # fmt: skip
        written.append(data)
        log(f"{component} ({entry.precision}): {inputs_path.name}, {reference_path.name}")
    return written


def commands(written: list[ComponentData], artifacts: Path) -> str:
    from common.engine_manifest import engines_dir

    lines = []
    for data in written:
        lines.append(
            f"# {data.component} ({data.precision}): rel L2 <= {data.max_rel_l2:g} (L2 <= {data.l2_threshold:.6g}), "
            f"cosine >= {data.min_cosine:g}, finite"
        )
        if data.onnxrt_runs:
            lines.append(shlex.join(["polygraphy", *data.onnxrt_args()]))
        else:
            lines.append(f"# ({data.precision}: ONNX Runtime's CPU provider has no kernels for this graph)")
        plan = engines_dir(Path(artifacts).absolute(), "rtx") / f"{data.component}.plan"
        lines.append("# on a GPU node, the TensorRT-RTX engine:")
        lines.append("POLYGRAPHY_USE_TENSORRT_RTX=1 " + shlex.join(["polygraphy", *data.engine_args(plan)]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = OneLineParser(prog="tools/polygraphy_reference.py", description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", required=True, type=Path, help="artifacts folder written by python -m export")
    parser.add_argument("--out", required=True, type=Path, help="folder for the .inputs.json and .reference.json files")
    parser.add_argument("--component", action="append", default=None, help="one component (repeatable; default: all)")
    args = parser.parse_args(argv)
    written = write_polygraphy_data(artifacts=args.artifacts, out=args.out, components=args.component)
    print(commands(written, args.artifacts))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
