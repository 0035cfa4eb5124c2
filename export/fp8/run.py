"""`python -m export --precision fp8`: the transformer's linears in FP8, everything else bf16.

An fp8 artifacts folder holds a bf16 VAE, a bf16 text encoder (or FP8 with
`--text-encoder-precision fp8`) and a transformer whose non-excluded `nn.Linear` layers are FP8
Q/DQ (`export.fp8.rewrite`). Each FP8 component is made in three steps:

1. calibrate (`export.fp8.calibrate`, cached): per-Linear input amax over the shipped prompts;
2. export the component at bf16 through the normal path (`run._export_component` on the job at bf16, passed in
   as `export_bf16` so this module follows whatever that path becomes);
3. rewrite the bf16 graph into the FP8 Q/DQ graph, audit it, and check it against fp32 PyTorch
   (`export.fp8.twin`): an fp32 twin in ONNX Runtime always, the bf16 graph itself in onnx's
   reference evaluator when small enough, and for the transformer an end-to-end image PSNR.

Everything the rewrite decided goes into the component's report: which layers are FP8 and which
stayed bf16 (and why), amax and scales, bytes before and after. `write_reports` turns that into
`reports/fp8_layers.json` and `reports/fp8_check.json`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic import atomic_write_json
from common.cli import parse_csv
from common.errors import Flux2TrtError, UsageError, VerificationError
from common.manifest import sha256_file
from common.precision import TOLERANCES
from export.fp8.calibrate import DEVICES, CalibrationSettings, load_prompts
from export.fp8.rewrite import DEFAULT_TEXT_ENCODER_EXCLUDE, DEFAULT_TRANSFORMER_EXCLUDE, is_excluded

# Bump when the FP8 graphs this code writes change for the same inputs (part of the cache key).
FP8_CODE_VERSION = 2  # 2: the renamed FP8 weights keep their value_info entries
# The exportable wrappers hold the diffusers/transformers model under these attribute names.
MODULE_PREFIX = {"transformer": "model.", "text_encoder": "language_model."}
# The fp32 twin doubles the bf16 weights in memory; beyond this it is not run on a CPU here.
TWIN_MAX_BYTES = 4 * 1024**3
TEXT_ENCODER_PRECISIONS = ("bf16", "fp8")


@dataclass(frozen=True)
class Fp8Options:
    exclude: tuple[str, ...] = DEFAULT_TRANSFORMER_EXCLUDE
    text_encoder_precision: str = "bf16"
    text_encoder_exclude: tuple[str, ...] = DEFAULT_TEXT_ENCODER_EXCLUDE
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)

    def component_precision(self, component: str) -> str:
        if component == "transformer":
            return "fp8"
        if component == "text_encoder":
            return self.text_encoder_precision
        return "bf16"  # the VAE: convolutions, no FP8 recipe, and small next to the transformer

    def exclude_for(self, component: str) -> tuple[str, ...]:
        return self.exclude if component == "transformer" else self.text_encoder_exclude

    def key_payload(self, component: str) -> dict:
        precision = self.component_precision(component)
        if precision != "fp8":
            return {"component_precision": precision}
        return {
            "component_precision": "fp8",
            "exclude": list(self.exclude_for(component)),
            "calibration": dataclasses.asdict(self.calibration),
            "fp8_code": FP8_CODE_VERSION,
        }


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser) -> None:
    group = parser.add_argument_group("fp8 (with --precision fp8)")
    group.add_argument(
        "--fp8-exclude",
        default=None,
        metavar="PATTERNS",
        help="comma-separated fnmatch patterns of transformer linears kept in bf16, replacing the default "
        f"{','.join(DEFAULT_TRANSFORMER_EXCLUDE)}; 'none' quantizes every linear",
    )
    group.add_argument(
        "--text-encoder-precision",
        default=None,
        metavar="bf16|fp8",
        help=f"one of {', '.join(TEXT_ENCODER_PRECISIONS)} (default bf16): FP8 linears in the text encoder too",
    )
    defaults = CalibrationSettings()
    group.add_argument(
        "--calib-prompts", type=int, default=None, metavar="N", help=f"calibration prompts (default {defaults.prompts})"
    )
    group.add_argument(
        "--calib-steps",
        type=int,
        default=None,
        metavar="N",
        help=f"denoising steps per prompt (default {defaults.steps})",
    )
    group.add_argument(
        "--calib-seed", type=int, default=None, metavar="N", help=f"seed of the first prompt (default {defaults.seed})"
    )
    group.add_argument(
        "--calib-device",
        default=None,
        metavar="cpu|cuda",
        help=f"one of {', '.join(DEVICES)} (default cpu: float32; cuda: bfloat16)",
    )


_FP8_FLAGS = ("fp8_exclude", "text_encoder_precision", "calib_prompts", "calib_steps", "calib_seed", "calib_device")


def options_from_args(args, precision: str) -> Fp8Options | None:
    given = [name for name in _FP8_FLAGS if getattr(args, name) is not None]
    if precision != "fp8":
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(f"{flag} applies to --precision fp8 only (got --precision {precision})")
        return None
    options = Fp8Options()
    if args.fp8_exclude is not None:
        patterns = () if args.fp8_exclude.strip().lower() == "none" else parse_csv(args.fp8_exclude)
        options = dataclasses.replace(options, exclude=patterns)
    if args.text_encoder_precision is not None:
        if args.text_encoder_precision not in TEXT_ENCODER_PRECISIONS:
            raise UsageError(
                f"--text-encoder-precision {args.text_encoder_precision!r} is not one of "
                f"{', '.join(TEXT_ENCODER_PRECISIONS)}"
            )
        options = dataclasses.replace(options, text_encoder_precision=args.text_encoder_precision)
    calibration = {
        field_name: getattr(args, f"calib_{field_name}")
        for field_name in ("prompts", "steps", "seed", "device")
        if getattr(args, f"calib_{field_name}") is not None
    }
    if calibration:
        options = dataclasses.replace(options, calibration=dataclasses.replace(options.calibration, **calibration))
    options.calibration.validate(len(load_prompts()))  # before any export work starts
    return options


# ---------------------------------------------------------------------------------------------
# Export


def check_patterns(patterns: tuple[str, ...], layers, component: str) -> None:
    """A pattern that matches no linear is a typo, not a choice: say so before exporting."""
    layers = list(layers)
    for pattern in patterns:
        if not any(is_excluded(layer, (pattern,)) for layer in layers):
            examples = ", ".join(layers[len(layers) // 2 : len(layers) // 2 + 2])
            raise UsageError(
                f"--fp8-exclude pattern {pattern!r} matches no linear layer of the {component} "
                f"(its {len(layers)} linears are named like {examples}); fix or drop the pattern"
            )


def linear_names(checkpoint, geometry, component: str) -> list[str]:
    """The `nn.Linear` paths of a component, from its config alone (built on the meta device)."""
    import torch

    from export.fp8.calibrate import language_model_of

    with torch.device("meta"):
        if component == "transformer":
            from diffusers import Flux2Transformer2DModel

            model = Flux2Transformer2DModel.from_config(checkpoint.configs["transformer"])
        else:
            from transformers import AutoConfig, AutoModel

            config = AutoConfig.from_pretrained(checkpoint.component_dir("text_encoder"))
            model = language_model_of(AutoModel.from_config(getattr(config, "text_config", None) or config))
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def export_component(job, options, *, export_bf16):
    """Export one component (an `export.run.ComponentJob`) of an fp8 artifacts folder; returns (manifest entry, report)."""
    component, spec, checkpoint, geometry = job.component, job.spec, job.checkpoint, job.geometry
    shapes, reference, staging, skip_check = job.shapes, job.reference, job.staging, job.skip_check
    precision = options.component_precision(component)
    bf16_job = dataclasses.replace(job, precision="bf16")
    if precision == "bf16":
        entry, report = export_bf16(bf16_job)
        report["note"] = "bf16 in an fp8 export: FP8 applies to the transformer (and --text-encoder-precision fp8)"
        return entry, report

    from export.fp8.calibrate import calibrate

    exclude = options.exclude_for(component)
    check_patterns(exclude, linear_names(checkpoint, geometry, component), component)
    calibration = calibrate(checkpoint, geometry, shapes, options.calibration)
    amax = calibration[component]

    entry, _ = export_bf16(dataclasses.replace(bf16_job, skip_check=True))
    onnx_name = entry.file
    bf16_bytes = dict(entry.bytes)
    records = _rewrite(staging, onnx_name, amax, exclude, MODULE_PREFIX[component])
    entry = dataclasses.replace(
        entry,
        precision="fp8",
        sha256={name: sha256_file(staging / name) for name in entry.files},
        bytes={name: (staging / name).stat().st_size for name in entry.files},
        nodes=_node_count(staging / onnx_name),
    )
    data_name = onnx_name + ".data"
    fp8_layers = [r.path for r in records if r.precision == "fp8"]
    report = {
        "method": None,
        "outputs": {},
        "tolerance": dataclasses.asdict(TOLERANCES["fp8"]),
        "passed": None,
        "fp8": {
            "exclude": list(exclude),
            "counts": {"fp8": len(fp8_layers), "bf16": len(records) - len(fp8_layers)},
            "fp8_layers": fp8_layers,
            "bf16_layers": [r.path for r in records if r.precision != "fp8"],
            "layers": [r.to_json() for r in records],
            "calibration": {
                "key": calibration["key"],
                "settings": calibration["settings"],
                "prompts": calibration["prompts"],
                "transformer_calls": calibration["transformer_calls"],
                "reused": calibration["reused"],
            },
            "sizes": {
                "bf16_data_bytes": bf16_bytes.get(data_name, 0),
                "fp8_data_bytes": entry.bytes.get(data_name, 0),
                "ratio": entry.bytes.get(data_name, 0) / max(bf16_bytes.get(data_name, 0), 1),
            },
        },
    }
    if skip_check:
        report["note"] = "numerics check skipped (--skip-check)"
    else:
        _verify(component, spec, checkpoint, geometry, shapes, reference, staging / onnx_name, report)
    return entry, report


def _rewrite(staging: Path, onnx_name: str, amax: dict, exclude, module_prefix: str):
    import onnx

    from common.onnx_checks import dynamic_dims, float64_uses
    from export.fp8.rewrite import Fp8GraphError, audit_qdq, quantize_graph

    work = Path(tempfile.mkdtemp(prefix=".fp8-", dir=staging))
    try:
        try:
            records = quantize_graph(
                staging / onnx_name, work / onnx_name, input_amax=amax, exclude=exclude, module_prefix=module_prefix
            )
        except Fp8GraphError as exc:
            raise Flux2TrtError(f"cannot place FP8 Q/DQ in {staging / onnx_name}: {exc}") from None
        for name in (onnx_name, onnx_name + ".data"):
            os.replace(work / name, staging / name)
    finally:
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()

    path = staging / onnx_name
    model = onnx.load(str(path), load_external_data=False)
    problems = [f"float64 at {p}" for p in float64_uses(model)] + [f"dynamic shape: {p}" for p in dynamic_dims(model)]
    audit = audit_qdq(model, module_prefix)
    for record in records:
        found = audit.get(record.path, {})
        want = (1, record.calls) if record.precision == "fp8" else (0, 0)
        got = (found.get("weight_dq_fp8"), found.get("activation_qdq"))
        if got != want:
            problems.append(f"{record.path}: weight DQ / activation Q-DQ {got}, expected {want}")
    if problems:
        raise Flux2TrtError(f"FP8 graph {path} is not what was asked for: {'; '.join(problems[:5])}")
    onnx.checker.check_model(str(path), full_check=False)
    return records


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _verify(component, spec, checkpoint, geometry, shapes, reference, path: Path, report: dict) -> None:
    import torch

    from export.fp8.twin import end_to_end, fp32_twin, ort_session
    from export.verify.onnx_run import REFERENCE_EVALUATOR_MAX_BYTES, run_graph
    from export.verify.reference import build_graph_module

    data_bytes = report["fp8"]["sizes"]["bf16_data_bytes"]
    tolerance = TOLERANCES["fp8"]
    if data_bytes * 2 > TWIN_MAX_BYTES:
        report["note"] = f"{data_bytes} bytes of bf16 weights: the fp32 twin is too large to run on a CPU here"
        return
    feeds = reference.feeds(spec)
    module = build_graph_module(component, checkpoint, geometry, shapes, "fp32")
    with torch.no_grad():
        expected = module(*[torch.from_numpy(feeds[t.name]) for t in spec.inputs]).numpy()
    del module
    output = spec.outputs[0].name

    with tempfile.TemporaryDirectory(prefix="flux2-fp8-twin-") as folder:
        twin = Path(folder) / path.name
        fp32_twin(path, twin)
        (actual,) = ort_session(twin).run([output], feeds)
        report["method"] = "onnxruntime-cpu-fp32-twin"
        report["outputs"] = {output: tolerance.judge(actual, expected)}
        passed = report["outputs"][output]["passed"]
        if data_bytes <= REFERENCE_EVALUATOR_MAX_BYTES:
            actual = run_graph(path, feeds, "onnx-reference-evaluator")[output]
            report["bf16_graph"] = {
                "method": "onnx-reference-evaluator",
                "outputs": {output: tolerance.judge(actual, expected)},
            }
            passed &= report["bf16_graph"]["outputs"][output]["passed"]
        else:
            report["bf16_graph"] = {"method": None, "note": "too large for onnx's reference evaluator here"}
        report["passed"] = bool(passed)
        if component == "transformer":
            print("fp8: end-to-end check against the bf16 pipeline", file=sys.stderr)
            report["end_to_end"] = end_to_end(checkpoint, geometry, shapes, twin)
    if not report["passed"]:
        worst = []
        for label, outputs in (
            ("fp32 twin", report["outputs"]),
            ("bf16 graph", report["bf16_graph"].get("outputs", {})),
        ):
            for name, metrics in outputs.items():
                worst.append(tolerance.describe(f"{label} {name}", metrics))
        raise VerificationError(f"{component} fp8 graph does not match PyTorch fp32: {'; '.join(worst)}")


def write_reports(reports_dir: Path, reports: dict) -> None:
    """reports/fp8_layers.json (which linear is in which precision, and its scales) and fp8_check.json."""
    layers, check = {}, {}
    for component, report in reports.items():
        details = report.get("fp8")
        if not details:
            continue
        layers[component] = {key: details[key] for key in ("exclude", "counts", "calibration", "layers")}
        check[component] = {
            "method": report["method"],
            "outputs": report["outputs"],
            "bf16_graph": report.get("bf16_graph"),
            "tolerance": report["tolerance"],
            "passed": report["passed"],
            "sizes": details["sizes"],
        }
        if "end_to_end" in report:
            check["end_to_end"] = report["end_to_end"]
    atomic_write_json(Path(reports_dir) / "fp8_layers.json", layers)
    atomic_write_json(Path(reports_dir) / "fp8_check.json", check)
