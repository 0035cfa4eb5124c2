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
    and none on a linear the report keeps in bf16;
  * NVFP4 components (`reports/nvfp4_layers.json`): one FP4 DYNAMIC_QUANTIZE layer per NVFP4 linear
    and one FP4 weight (a DEQUANTIZE of an FP4 constant) per NVFP4 linear, each reaching a matrix
    multiply through its DEQUANTIZE (and the Cast / Transpose the export puts between).

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
    quantized_linears: int | None = None  # FP8 / FP4 quantized linears found, for the table

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


def read_layers_report(artifacts: Path, precision: str) -> dict:
    """The export's per-linear report of a quantized folder (`Precision.layers_report`:
    reports/fp8_layers.json, reports/nvfp4_layers.json): {component: {"layers": [{"path", "precision"},
    ...]}}; {} when the precision has none or the file is absent."""
    name = declared(precision).layers_report
    path = Path(artifacts) / "reports" / name if name else None
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}


def parse_component(
    api, component: str, onnx_path: Path, precision: str, layers_report: dict | None, kept_float32=()
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
    rewrite = declared(precision).rewrite
    if layers_report and rewrite in QUANTIZED_CENSUS:
        report.findings += QUANTIZED_CENSUS[rewrite](layers, layers_report, report)
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
    report.quantized_linears = len(set(quantized) & fp8_paths)
    return found


def _producers(layers) -> dict[str, object]:
    return {layer.get_output(i).name: layer for layer in layers for i in range(layer.num_outputs)}


# Layers the export puts between an NVFP4 DEQUANTIZE and its matrix multiply (Cast to bf16, the
# weight's Transpose; the parser adds a broadcast SHUFFLE).
_PASS_THROUGH = ("CAST", "SHUFFLE")


def _reaches_matmul(layer, consumers, depth: int = 4) -> bool:
    """Whether `layer`'s output reaches a MATRIX_MULTIPLY through CAST / SHUFFLE layers only."""
    for reader in consumers.get(layer.get_output(0).name, []):
        if reader.type.name == "MATRIX_MULTIPLY":
            return True
        if reader.type.name in _PASS_THROUGH and depth > 0 and _reaches_matmul(reader, consumers, depth - 1):
            return True
    return False


def _is_fp4_constant(layer) -> bool:
    return layer is not None and layer.type.name == "CONSTANT" and layer.get_output_type(0).name == "FP4"


def _fp4_value_dequantizes(layer, consumers) -> list:
    """The DEQUANTIZE layers that read `layer`'s first output as their values (input 0)."""
    name = layer.get_output(0).name
    return [r for r in consumers.get(name, []) if r.type.name == "DEQUANTIZE" and r.get_input(0).name == name]


def nvfp4_findings(layers, nvfp4_report: dict, report: ParseReport) -> list[Finding]:
    """FP4 activation quantizers and FP4 weights in TensorRT's network against the report's NVFP4 linears.

    Counted, not mapped by name: each must reach a matrix multiply through its DEQUANTIZE."""
    expected = sum(1 for r in nvfp4_report.get("layers", []) if declared(r["precision"]).quantized)
    consumers, producers = _consumers(layers), _producers(layers)
    quantizers = [q for q in layers if q.type.name == "DYNAMIC_QUANTIZE" and q.get_output_type(0).name == "FP4"]
    weights = [
        d for d in layers if d.type.name == "DEQUANTIZE" and _is_fp4_constant(producers.get(d.get_input(0).name))
    ]
    found = []
    feeding = 0
    for quantize in quantizers:
        if any(_reaches_matmul(dq, consumers) for dq in _fp4_value_dequantizes(quantize, consumers)):
            feeding += 1
        else:
            found.append(
                Finding(
                    "nvfp4",
                    f"layer {quantize.name} (DYNAMIC_QUANTIZE)",
                    "feeds no matrix multiply through a DEQUANTIZE",
                )
            )
    for weight in weights:
        if not _reaches_matmul(weight, consumers):
            found.append(Finding("nvfp4", f"layer {weight.name} (DEQUANTIZE)", "FP4 weight feeds no matrix multiply"))
    for what, count in (
        ("FP4 activation quantizers (DYNAMIC_QUANTIZE)", len(quantizers)),
        ("FP4 weights", len(weights)),
    ):
        if count != expected:
            found.append(
                Finding(
                    "nvfp4", what, f"{count} in TensorRT's network for {expected} NVFP4 linears in the export's report"
                )
            )
    report.quantized_linears = min(feeding, len(weights))
    return found


# Precision.rewrite -> what TensorRT's network must show for it (as export.component_export's REWRITES).
QUANTIZED_CENSUS = {"fp8": fp8_findings, "nvfp4": nvfp4_findings}


def parse_artifacts(api, folder: Path, manifest: ArtifactsManifest) -> list[ParseReport]:
    reports = []
    for name, entry in manifest.components.items():
        kept = entry.float32_matmuls or ()
        # Each graph's own report: an nvfp4 folder's text encoder may be fp8 (reports/fp8_layers.json).
        layers_report = read_layers_report(folder, entry.precision).get(name)
        reports.append(parse_component(api, name, folder / entry.file, entry.precision, layers_report, kept))
    return reports


def format_parse_table(reports: list[ParseReport], label: str, quantized_expected: dict) -> str:
    header = f"{'component':<17}{'parse':<7}{'layers':>7}  {'matrix multiplies':<20}{'quantized':<16}result"
    lines = [f"{label} ONNX parser: TensorRT's own network per graph (no build)", header, "-" * len(header)]
    for report in reports:
        matmuls = Counter({d: n for (t, d), n in report.census.items() if t == "MATRIX_MULTIPLY"})
        matmul_text = ", ".join(f"{d} {n}" for d, n in sorted(matmuls.items())) or "-"
        expected = quantized_expected.get(report.component)
        fp8_text = "-" if expected is None else f"{report.quantized_linears or 0} / {expected} linears"
        result = "pass" if not report.findings else "FAIL"
        lines.append(
            f"{report.component:<17}{'ok' if report.parsed else 'FAIL':<7}{report.layers:>7}  {matmul_text:<20}{fp8_text:<16}{result}"
        )
    for report in reports:
        if report.parsed:
            types = ", ".join(f"{d} {n}" for d, n in sorted(report.output_types().items(), key=lambda x: -x[1]))
            lines.append(f"{report.component} layer output types: {types}")
        for finding in report.findings:
            lines.append(f"{report.component}: {finding.check}: {finding}")
    return "\n".join(lines)
