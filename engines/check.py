"""python -m engines.check DIR: will TensorRT's ONNX parser accept every graph in an artifacts folder?

First, on a CPU, without TensorRT and without reading weights: operator support and per-node types
against TensorRT's published operator list (`tensorrt_ops.json`), opset range, no float64, fully
static shapes, one external-data file beside each model, well-formed FP8 and NVFP4 Q/DQ, and graph inputs
and outputs equal to the manifest's declaration. Then, where TensorRT or TensorRT-RTX imports, each
graph goes through its real ONNX parser (engines.trt_parse): the parse result, the layer count, a
census of layer output types, and what the precision promises (FP8 quantizers, matrix multiply
types). Prints tables; exits 1 naming the offending nodes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import OneLineParser, run_cli
from common.dtypes import ONNX_ELEMENT_TYPE
from common.errors import ArtifactsError, EngineCompatibilityError
from common.manifest import ComponentRecord, read_manifest
from common.precision import precision as declared
from engines import graph_checks
from engines.nvfp4_qdq import check_nvfp4_qdq
from engines.ops_table import load_table
from engines.qdq import check_fp8_qdq

GRAPH_CHECKS = {
    "opset": graph_checks.check_opset,
    "operators": graph_checks.check_operators,
    "types": graph_checks.check_types,
    "limits": graph_checks.check_limits,
    "float64": graph_checks.check_float64,
    "static": graph_checks.check_static,
    "external data": graph_checks.check_external_data,
    "fp8 q/dq": check_fp8_qdq,
    "nvfp4 q/dq": check_nvfp4_qdq,
}


@dataclass
class ComponentReport:
    component: str
    file: str
    opset: int
    nodes: int
    op_types: int
    findings: list[graph_checks.Finding] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.findings


def check_io(graph: graph_checks.Graph, entry: ComponentRecord) -> list[graph_checks.Finding]:
    """Graph inputs/outputs are the manifest's declaration: the names, shapes and dtypes engines are built with."""
    found = []
    for kind, values in (("inputs", graph.model.graph.input), ("outputs", graph.model.graph.output)):
        declared = [(t.name, tuple(t.shape), ONNX_ELEMENT_TYPE.get(t.dtype, -1)) for t in getattr(entry, kind)]
        actual = [
            (v.name, tuple(d.dim_value for d in v.type.tensor_type.shape.dim), v.type.tensor_type.elem_type)
            for v in values
        ]
        if actual != declared:
            found.append(
                graph_checks.Finding(
                    "io", f"graph {kind}", f"{actual} differ from the manifest's {declared}; re-export"
                )
            )
    return found


def check_graph(
    path: Path, entry: ComponentRecord | None = None, table: dict | None = None
) -> tuple[graph_checks.Graph, list[graph_checks.Finding]]:
    table = table or load_table()
    graph = graph_checks.Graph.load(path)
    findings = []
    for check in GRAPH_CHECKS.values():
        findings += check(graph, table)
    if entry is not None:
        findings += check_io(graph, entry)
    return graph, findings


def check_artifacts(folder: Path) -> list[ComponentReport]:
    folder = Path(folder)
    manifest = read_manifest(folder)
    components = manifest.components
    if not components:
        raise ArtifactsError(f"{folder}/manifest.json lists no components; re-run export")
    reports = []
    for name, entry in components.items():
        path = folder / entry.file
        if not path.is_file():
            raise ArtifactsError(f"{path} is listed in {folder}/manifest.json but missing; re-export with --force")
        graph, findings = check_graph(path, entry)
        reports.append(
            ComponentReport(
                component=name,
                file=entry.file,
                opset=graph.opset,
                nodes=len(graph.model.graph.node),
                op_types=len({n.op_type for n in graph.model.graph.node}),
                findings=findings,
            )
        )
    return reports


def format_table(reports: list[ComponentReport], table: dict) -> str:
    columns = [*graph_checks.CHECKS]
    header = (
        f"{'component':<17}{'opset':>6}{'nodes':>7}{'ops':>5}  "
        + "".join(f"{c:<{max(len(c), 4) + 2}}" for c in columns)
        + "result"
    )
    lines = [
        f"TensorRT {table['tensorrt_version']} ONNX support (onnx-tensorrt operators.md, opset {table['opset']['min']}..{table['opset']['max']})",
        header,
        "-" * len(header),
    ]
    for report in reports:
        counts = {c: sum(f.check == c for f in report.findings) for c in columns}
        cells = "".join(f"{('ok' if counts[c] == 0 else str(counts[c])):<{max(len(c), 4) + 2}}" for c in columns)
        result = "pass" if report.passed else "FAIL"
        lines.append(f"{report.component:<17}{report.opset:>6}{report.nodes:>7}{report.op_types:>5}  {cells}{result}")
    for report in reports:
        for finding in report.findings:
            lines.append(f"{report.component}: {finding.check}: {finding}")
    return "\n".join(lines)


def run_parse(folder: Path, out) -> list:
    """The real parser's half; [] with one printed line where no TensorRT imports."""
    from engines.trt_parse import format_parse_table, parse_artifacts, parser_api, read_layers_report

    api, found = parser_api()
    if api is None:
        print(f"TensorRT parse skipped: {found}", file=out)
        return []
    manifest = read_manifest(folder)
    reports = parse_artifacts(api, Path(folder), manifest)
    expected = {}
    for name, entry in manifest.components.items():
        report = read_layers_report(folder, entry.precision).get(name)
        if report is not None:
            expected[name] = sum(1 for r in report.get("layers", []) if declared(r["precision"]).quantized)
    print(format_parse_table(reports, f"{api.label} {api.version}", expected), file=out)
    return reports


def run_check(*, folder: Path, out=None, parse: bool = True) -> list[ComponentReport]:
    """Check `folder`, print the tables; raise EngineCompatibilityError naming the offending nodes."""
    out = out or sys.stdout
    reports = check_artifacts(folder)
    print(format_table(reports, load_table()), file=out)
    failed = [(r.component, f) for r in reports for f in r.findings]
    if parse:
        failed += [(r.component, f) for r in run_parse(folder, out) for f in r.findings]
    if failed:
        shown = ", ".join(f"{component} {finding.where} [{finding.check}]" for component, finding in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        raise EngineCompatibilityError(f"{len(failed)} TensorRT problem(s) in {folder}: {shown}{more}; details above")
    return reports


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m engines.check", description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, help="artifacts folder written by python -m export")
    parser.add_argument(
        "--no-parse",
        action="store_true",
        help="only the static checks: skip TensorRT's parser (it holds the weights in host memory)",
    )
    args = parser.parse_args(argv)
    run_check(folder=args.artifacts, parse=not args.no_parse)
    return 0


def cli() -> None:
    """The console script: user errors as one line and an exit code, as `python -m` gives them."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
