"""engines.check's second half: each graph through a real TensorRT ONNX parser, and what the network holds.

Where TensorRT imports with a GPU it is used, else TensorRT-RTX (`tensorrt_rtx`, on PyPI, which
parses and builds without a GPU). Parsing builds TensorRT's own network from the graph (weights
included, so it needs host memory of the weights' size); nothing is compiled. Per component:

- the parse result: a failure names the ONNX node and TensorRT's message;
- the network's layer count and a census of layer output types (`ILayer.type`, `get_output_type(0)`);
- what the precision promises, read from TensorRT's network, not from the ONNX file:
  * fp16 / bf16 components: every matrix multiply computes in HALF / BF16 (none left in FLOAT;
    the export keeps none there on purpose, measured on every tiny graph);
  * FP8 components (the export's `reports/fp8_layers.json`): one FP8 QUANTIZE layer per FP8 linear,
    each feeding a matrix multiply through a DEQUANTIZE, one FP8 weight constant per FP8 linear,
    and none on a linear the report keeps in bf16.

Layer names are the ONNX node names; the export names an FP8 activation quantizer
`<linear path>.input_fp8[.i]/QuantizeLinear` (export/fp8/rewrite.py), which maps a QUANTIZE layer to
its linear.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common.manifest import ArtifactsManifest
from common.precision import precision as declared
from engines.graph_checks import Finding

FP8_INPUT_MARK = ".input_fp8"


@dataclass
class ParseReport:
    component: str
    parsed: bool
    layers: int = 0
    census: Counter = field(default_factory=Counter)  # (layer type, output type) -> count
    findings: list[Finding] = field(default_factory=list)
    fp8_linears: int | None = None  # FP8 QUANTIZE layers found, for the table

    def output_types(self) -> Counter:
        totals = Counter()
        for (_, dtype), count in self.census.items():
            totals[dtype] += count
        return totals


def parser_api():
    """(TrtApi or None, description): TensorRT where it and a GPU are present, else TensorRT-RTX."""
    from common.tensorrt_env import import_trt, module_status, trt_status
    from engines.trt_build import TrtApi

    trt_ok, trt_reason = trt_status("tensorrt")
    if trt_ok:
        return TrtApi(import_trt("tensorrt"), "tensorrt"), trt_reason
    rtx_ok, rtx_reason = module_status("rtx")
    if rtx_ok:
        return TrtApi(import_trt("rtx"), "rtx"), rtx_reason
    return None, f"{trt_reason}; {rtx_reason}"


def read_fp8_layers(artifacts: Path) -> dict:
    """The export's FP8 report: {component: {"layers": [{"path", "precision"}, ...]}}; {} when absent."""
    path = Path(artifacts) / "reports" / "fp8_layers.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def parse_component(
    api, component: str, onnx_path: Path, precision: str, fp8_report: dict | None, kept_float32=()
) -> ParseReport:
    from engines.trt_build import EngineBuildError, parse_onnx

    trt = api.trt
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    try:
        network, _parser = parse_onnx(api, builder, logger, onnx_path)
    except EngineBuildError as exc:
        return ParseReport(component, parsed=False, findings=[Finding("trt parse", onnx_path.name, str(exc))])
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    report = ParseReport(component, parsed=True, layers=len(layers))
    for layer in layers:
        dtype = layer.get_output_type(0).name if layer.num_outputs else "-"
        report.census[(layer.type.name, dtype)] += 1
    report.findings += matmul_findings(layers, precision, kept_float32)
    if fp8_report:
        report.findings += fp8_findings(layers, fp8_report, report)
    return report


def matmul_findings(layers, precision: str, kept_float32=()) -> list[Finding]:
    """Matrix multiplies not in the graph's precision, except those the export lists as float32 on purpose."""
    want = declared(precision).trt_matmul_type
    if want is None:
        return []  # fp32: nothing narrower was promised
    allowed = set(kept_float32)
    found = []
    for layer in layers:
        if layer.type.name != "MATRIX_MULTIPLY":
            continue
        computes = layer.get_output_type(0).name
        if computes == want or (computes == "FLOAT" and layer.name in allowed):
            continue
        found.append(
            Finding(
                "precision",
                f"layer {layer.name} (MATRIX_MULTIPLY)",
                f"computes in {computes}; a {precision} graph promises {want} "
                "(the manifest's float32_matmuls lists the exceptions)",
            )
        )
    return found


def _consumers(layers) -> dict[str, list]:
    consumers: dict[str, list] = {}
    for layer in layers:
        for index in range(layer.num_inputs):
            tensor = layer.get_input(index)
            if tensor is not None:
                consumers.setdefault(tensor.name, []).append(layer)
    return consumers


def _feeds_fp8_matmul(quantize, consumers) -> bool:
    """QUANTIZE -> DEQUANTIZE -> MATRIX_MULTIPLY, as TensorRT's network holds it."""
    for dq in consumers.get(quantize.get_output(0).name, []):
        if dq.type.name == "DEQUANTIZE":
            if any(c.type.name == "MATRIX_MULTIPLY" for c in consumers.get(dq.get_output(0).name, [])):
                return True
    return False


def fp8_findings(layers, fp8_report: dict, report: ParseReport) -> list[Finding]:
    records = fp8_report.get("layers", [])
    fp8_paths = {r["path"] for r in records if declared(r["precision"]).quantized}
    kept = {r["path"] for r in records if not declared(r["precision"]).quantized}
    consumers = _consumers(layers)
    found, quantized = [], Counter()
    quantizes = [q for q in layers if q.type.name == "QUANTIZE" and q.get_output_type(0).name == "FP8"]
    for quantize in quantizes:
        where = f"layer {quantize.name} (QUANTIZE)"
        path = quantize.name.split(FP8_INPUT_MARK)[0] if FP8_INPUT_MARK in quantize.name else None
        if path in kept:
            found.append(Finding("fp8", where, f"quantizes linear {path}, which the export keeps in bf16"))
        elif path not in fp8_paths:
            found.append(Finding("fp8", where, "is no FP8 linear of the export's reports/fp8_layers.json"))
        if not _feeds_fp8_matmul(quantize, consumers):
            found.append(Finding("fp8", where, "feeds no matrix multiply through a DEQUANTIZE"))
        quantized[path] += 1
    for path in sorted(fp8_paths - set(quantized)):
        found.append(
            Finding(
                "fp8",
                f"linear {path}",
                "is FP8 in the export's report but TensorRT's network has no FP8 QUANTIZE for it",
            )
        )
    weights = sum(1 for c in layers if c.type.name == "CONSTANT" and c.get_output_type(0).name == "FP8")
    if weights != len(fp8_paths):
        found.append(
            Finding(
                "fp8", "FP8 weights", f"{weights} FP8 constants for {len(fp8_paths)} FP8 linears in the export's report"
            )
        )
    report.fp8_linears = len(set(quantized) & fp8_paths)
    return found


def parse_artifacts(api, folder: Path, manifest: ArtifactsManifest) -> list[ParseReport]:
    fp8_layers = read_fp8_layers(folder)
    reports = []
    for name, entry in manifest.components.items():
        kept = entry.float32_matmuls or ()
        reports.append(parse_component(api, name, folder / entry.file, entry.precision, fp8_layers.get(name), kept))
    return reports


def format_parse_table(reports: list[ParseReport], label: str, fp8_expected: dict) -> str:
    header = f"{'component':<13}{'parse':<7}{'layers':>7}  {'matrix multiplies':<20}{'fp8 quantize':<16}result"
    lines = [f"{label} ONNX parser: TensorRT's own network per graph (no build)", header, "-" * len(header)]
    for report in reports:
        matmuls = Counter({d: n for (t, d), n in report.census.items() if t == "MATRIX_MULTIPLY"})
        matmul_text = ", ".join(f"{d} {n}" for d, n in sorted(matmuls.items())) or "-"
        expected = fp8_expected.get(report.component)
        fp8_text = "-" if expected is None else f"{report.fp8_linears or 0} / {expected} linears"
        result = "pass" if not report.findings else "FAIL"
        lines.append(
            f"{report.component:<13}{'ok' if report.parsed else 'FAIL':<7}{report.layers:>7}  {matmul_text:<20}{fp8_text:<16}{result}"
        )
    for report in reports:
        if report.parsed:
            types = ", ".join(f"{d} {n}" for d, n in sorted(report.output_types().items(), key=lambda x: -x[1]))
            lines.append(f"{report.component} layer output types: {types}")
        for finding in report.findings:
            lines.append(f"{report.component}: {finding.check}: {finding}")
    return "\n".join(lines)
