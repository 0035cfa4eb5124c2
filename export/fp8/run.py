"""`python -m export --precision fp8`: the transformer's linears in FP8, everything else bf16.

An fp8 artifacts folder holds a bf16 VAE, a bf16 text encoder (or FP8 with
`--text-encoder-precision fp8`) and a transformer whose non-excluded `nn.Linear` layers are FP8
Q/DQ (`export.fp8.rewrite`). The export writes every graph the same way (`export.component_export`):
traced at bf16, the precision fp8 is traced at, then, for an FP8 component, `quantize` here is
the post-pass on the written graph:

1. calibrate (`export.fp8.calibrate`, cached): per-Linear input amax over the shipped prompts;
2. rewrite the bf16 graph into the FP8 Q/DQ graph in place, and audit it.

The check that follows is the one every precision gets (`export.verify.check`): for FP8 an fp32
twin in ONNX Runtime, the bf16 graph itself in onnx's reference evaluator when small enough, and
for the transformer an end-to-end image PSNR.

Everything the rewrite decided goes into the component's report: which layers are FP8 and which
stayed bf16 (and why), amax and scales, bytes before and after. `write_reports` turns that into
`reports/fp8_layers.json` and `reports/fp8_check.json`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic import atomic_write_json
from common.cli import parse_csv
from common.errors import Flux2TrtError, InternalError, UsageError
from common.precision import PRECISIONS
from common.precision import precision as declared
from export.components import COMPONENTS
from export.fp8.calibrate import DEVICES, CalibrationSettings, load_prompts
from export.fp8.rewrite import DEFAULT_TEXT_ENCODER_EXCLUDE, DEFAULT_TRANSFORMER_EXCLUDE, is_excluded

# Bump when the FP8 graphs this code writes change for the same inputs (part of the cache key).
FP8_CODE_VERSION = 2  # 2: the renamed FP8 weights keep their value_info entries
# Per rewrite (Precision.rewrite), as FP8_CODE_VERSION is for fp8.
CODE_VERSIONS = {"fp8": FP8_CODE_VERSION, "nvfp4": 1}
FP8 = PRECISIONS["fp8"]
# The text encoder's choices in an fp8 folder: as traced (bf16), or FP8 linears too.


@dataclass(frozen=True)
class Fp8Options:
    """The quantized export's choices (fp8 or nvfp4: the same calibration, exclusions and reports)."""

    precision: str = "fp8"  # the folder's quantized precision
    exclude: tuple[str, ...] = DEFAULT_TRANSFORMER_EXCLUDE
    text_encoder_precision: str = "bf16"
    text_encoder_exclude: tuple[str, ...] = DEFAULT_TEXT_ENCODER_EXCLUDE
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    # --transformer-weights: the NVFP4 layers, codes and scales come from that file, not calibration.
    transformer_weights: str | None = None

    @property
    def quantizes_text_encoder(self) -> bool:
        return declared(self.text_encoder_precision).quantized

    def component_precision(self, component: str) -> str:
        """The precision of `component`'s graph in the quantized folder these options export.

        The text encoder has its own (`--text-encoder-precision`): an nvfp4 folder's may be fp8."""
        if self.quantizes_text_encoder and component == "text_encoder":
            return declared(self.text_encoder_precision).name
        return declared(self.precision).of_component(component).name

    def exclude_for(self, component: str) -> tuple[str, ...]:
        model = COMPONENTS[component].model_component  # a step-cache graph's are the transformer's
        return {"transformer": self.exclude, "text_encoder": self.text_encoder_exclude}[model]

    def key_payload(self, component: str) -> dict:
        precision = self.component_precision(component)
        if not declared(precision).quantized:
            return {"component_precision": precision}
        return {
            "component_precision": precision,
            "exclude": list(self.exclude_for(component)),
            "calibration": dataclasses.asdict(self.calibration),
            f"{declared(precision).rewrite}_code": CODE_VERSIONS[declared(precision).rewrite],
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
        metavar="bf16|fp8|nvfp4",
        help="bf16 (the default) or the folder's --precision (fp8 or nvfp4): quantized linears in the text encoder too",
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


def text_encoder_choices(folder) -> tuple[str, ...]:
    """The text encoder's precisions in a `folder` precision export: as traced, or a quantized precision
    whose GPUs run the folder's (an nvfp4 folder's text encoder may be fp8; an fp8 one's not nvfp4)."""

    def oldest(p):
        return tuple(int(part) for part in (p.min_compute_capability or "0.0").split("."))

    quantized = [p.name for p in PRECISIONS.values() if p.quantized and oldest(p) <= oldest(folder)]
    return (folder.traced.name, *quantized)


def options_from_args(args, precision: str) -> Fp8Options | None:
    given = [name for name in _FP8_FLAGS if getattr(args, name) is not None]
    if not declared(precision).quantized:
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(f"{flag} applies to --precision fp8 only (got --precision {precision})")
        return None
    options = Fp8Options(precision=declared(precision).name)
    if args.fp8_exclude is not None:
        patterns = () if args.fp8_exclude.strip().lower() == "none" else parse_csv(args.fp8_exclude)
        options = dataclasses.replace(options, exclude=patterns)
    if args.text_encoder_precision is not None:
        choices = text_encoder_choices(declared(precision))
        if args.text_encoder_precision not in choices:
            raise UsageError(
                f"--text-encoder-precision {args.text_encoder_precision!r} is not one of "
                f"{', '.join(choices)} (with --precision {precision})"
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


def check_options(options: Fp8Options, checkpoint, geometry, components) -> None:
    """Refuse an --fp8-exclude pattern that matches no linear, before anything is exported."""
    for component in components:
        if declared(options.component_precision(component)).quantized:
            exclude = options.exclude_for(component)
            check_patterns(exclude, linear_names(checkpoint, geometry, component), component)


def quantize(path: Path, options: Fp8Options, component: str, calibration_inputs, precision=FP8) -> dict:
    """Rewrite the bf16 graph at `path` (+ .data) into its quantized form in place; the report's part.

    `precision` is fp8 (Q/DQ, `export.fp8.rewrite`) or nvfp4 (`export.nvfp4.rewrite`): the same
    calibration, exclusions and report, another rewrite. `calibration_inputs` is (checkpoint,
    geometry, shapes), what the calibration runs the pipeline on.
    """
    from export.fp8.calibrate import calibrate

    precision = declared(precision)
    exclude = options.exclude_for(component)
    model = COMPONENTS[component].model_component  # calibrated and imported as the model it is a part of
    imported = _imported(options, model, calibration_inputs[0])
    if imported is not None and len(imported.static_input_names) == len(imported.nvfp4_names):
        # The file decides the layers and carries every scale: nothing to calibrate.
        calibration = {model: {}, "imported": str(imported.path)}
    else:
        # Layers the file gives no input_scale still need a constant global scale (TensorRT): calibrated
        # on the file's own weights (the staged checkpoint's transformer).
        calibration = calibrate(*calibration_inputs, options.calibration)
        if imported is not None:
            calibration = {**calibration, "imported": str(imported.path)}
    data = path.with_name(path.name + ".data")
    bf16_bytes = data.stat().st_size if data.exists() else 0
    records = _rewrite(
        path.parent,
        path.name,
        calibration[model],
        exclude,
        COMPONENTS[component].initializer_prefix,
        precision,
        imported,
    )
    quantized_bytes = data.stat().st_size if data.exists() else 0
    quantized = [r.path for r in records if r.quantized]
    name, traced = precision.name, precision.traced.name
    return {
        "exclude": list(exclude),
        "counts": {name: len(quantized), traced: len(records) - len(quantized)},
        f"{name}_layers": quantized,
        f"{traced}_layers": [r.path for r in records if not r.quantized],
        "layers": [r.to_json() for r in records],
        "calibration": {
            key: calibration[key]
            for key in ("key", "settings", "prompts", "transformer_calls", "reused", "imported")
            if key in calibration
        },
        "sizes": {
            f"{traced}_data_bytes": bf16_bytes,
            f"{name}_data_bytes": quantized_bytes,
            "ratio": quantized_bytes / max(bf16_bytes, 1),
        },
    }


def quantize_nvfp4(path: Path, options: Fp8Options, component: str, calibration_inputs) -> dict:
    return quantize(path, options, component, calibration_inputs, PRECISIONS["nvfp4"])


def _imported(options: Fp8Options, component: str, checkpoint):
    """The --transformer-weights file of an nvfp4 transformer, its header read (export.nvfp4.published)."""
    if options.transformer_weights is None or component != "transformer":
        return None
    from export.nvfp4.published import read_published

    return read_published(options.transformer_weights, checkpoint.configs["transformer"])


def _rewriter(precision):
    """(quantize_graph, audit problems) of the rewrite `precision` names."""
    if precision.rewrite == FP8.rewrite:
        from export.fp8 import rewrite
    else:
        from export.nvfp4 import rewrite
    return rewrite.quantize_graph, rewrite.audit_problems


def _rewrite(staging: Path, onnx_name: str, amax: dict, exclude, module_prefix: str, precision=FP8, imported=None):
    import onnx

    from common.onnx_checks import dynamic_dims, float64_uses
    from export.fp8.rewrite import Fp8GraphError

    quantize_graph, audit_problems = _rewriter(precision)
    work = Path(tempfile.mkdtemp(prefix=f".{precision}-", dir=staging))
    try:
        try:
            extra = {"imported": imported} if imported is not None else {}
            records = quantize_graph(
                staging / onnx_name,
                work / onnx_name,
                input_amax=amax,
                exclude=exclude,
                module_prefix=module_prefix,
                **extra,
            )
        except Fp8GraphError as exc:
            raise Flux2TrtError(f"cannot place {precision} quantization in {staging / onnx_name}: {exc}") from None
        for name in (onnx_name, onnx_name + ".data"):
            os.replace(work / name, staging / name)
    finally:
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()

    path = staging / onnx_name
    model = onnx.load(str(path), load_external_data=False)
    problems = [f"float64 at {p}" for p in float64_uses(model)] + [f"dynamic shape: {p}" for p in dynamic_dims(model)]
    problems += audit_problems(model, module_prefix, records)
    if problems:
        raise InternalError(f"{precision} graph {path} is not what was asked for: {'; '.join(problems[:5])}")
    onnx.checker.check_model(str(path), full_check=False)
    return records


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def write_reports(reports_dir: Path, reports: dict, precision=FP8) -> None:
    """reports/<precision>_layers.json (which linear is in which precision, and its scales) and
    <precision>_check.json, for the folder's precision and any other quantized precision a graph has
    (an nvfp4 folder's fp8 text encoder)."""
    names = {declared(precision).name} | {
        p.name for p in PRECISIONS.values() if p.quantized and any(p.name in r for r in reports.values())
    }
    for name in sorted(names):
        _write_reports_of(reports_dir, reports, name)


def _write_reports_of(reports_dir: Path, reports: dict, name: str) -> None:
    layers, check = {}, {}
    for component, report in reports.items():
        details = report.get(name)
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
    atomic_write_json(Path(reports_dir) / f"{name}_layers.json", layers)
    atomic_write_json(Path(reports_dir) / f"{name}_check.json", check)
