"""One declaration per precision: everything the code knows about fp32, fp16, bf16, fp8 and nvfp4.

A precision name is read from the command line or a manifest once (`precision(name)`), and every
consumer then asks the record: the dtype the PyTorch modules compute in, the bounds a graph is held
to against fp32 PyTorch, the bytes an export writes per weight, the type TensorRT's matrix
multiplies must show, which CPU path can run the graph, which GPUs can build it, and how the
export realises it (a cast at trace time, or a rewrite of the written graph). This is the only
module that compares precision names; adding a precision is one entry here plus its rewrite.

An fp8 artifacts folder is mixed: its transformer (and on request its text encoder) is FP8 Q/DQ,
everything else bf16. `Precision.of_component` gives the precision each graph of a folder has, and
that is what a component record in the manifest names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import UsageError


@dataclass(frozen=True)
class Tolerance:
    max_rel_l2: float
    min_cosine: float

    def judge(self, actual, expected) -> dict:
        """compare()'s metrics plus `passed`: finite, within rel L2 and above cosine. The one judgement."""
        from common.metrics import compare

        metrics = compare(actual, expected)
        metrics["passed"] = bool(
            metrics["finite"] and metrics["rel_l2"] <= self.max_rel_l2 and metrics["cosine"] >= self.min_cosine
        )
        return metrics

    def describe(self, name: str, metrics: dict) -> str:
        """One failing (or passing) output, with the bounds it was held to."""
        text = (
            f"rel_l2 {metrics['rel_l2']:.3g} (max {self.max_rel_l2:g}), cosine {metrics['cosine']:.6f} "
            f"(min {self.min_cosine:g}), max_abs {metrics['max_abs']:.3g}"
        )
        if not metrics["finite"]:  # an activation left the precision's range, or the weights hold NaN/Inf
            return f"{name}: NON-FINITE values ({metrics['non_finite']} inf/nan), {text}"
        return f"{name}: {text}"


# How a graph of this precision is checked on a CPU (export, runtime.check):
ORT_CPU = "onnxruntime-cpu"  # ONNX Runtime's CPU provider runs the graph itself
REFERENCE_EVALUATOR = "onnx-reference-evaluator"  # onnx's numpy evaluator (exact, slow: small graphs only)
FP32_TWIN = "onnxruntime-cpu-fp32-twin"  # a float32 copy of the Q/DQ graph in ONNX Runtime


@dataclass(frozen=True)
class Precision:
    name: str
    compute_dtype: str  # the dtype PyTorch modules (and diffusers' reference) run in: numpy/torch name
    tolerance: Tolerance  # a graph against fp32 PyTorch on the reference inputs (docs/export.md)
    bytes_per_element: int  # written per weight element at the export's peak (a rewrite keeps both copies)
    trt_matmul_type: str | None  # TensorRT DataType name every matrix multiply must show; None: not held
    cpu_check: str  # ORT_CPU | REFERENCE_EVALUATOR | FP32_TWIN
    # The precision the exporter traces at; a rewrite then turns that graph into this one.
    traced_as: str = ""
    rewrite: str | None = None  # None: a cast at trace time; "fp8": export.fp8's Q/DQ post-pass
    min_compute_capability: str | None = None  # the oldest GPU whose tensor cores run it
    architecture: str | None = None  # that GPU's architecture, for messages: "Ada", "Blackwell"
    # The TensorRT-RTX targets an engine of it is built for when none is asked for; None: TensorRT-RTX's
    # own defaults. Set where those defaults include GPUs that cannot run it (docs/engines.md#nvfp4).
    rtx_compute_capabilities: tuple[str, ...] | None = None
    # The components of a folder at this precision that are not of it, and what they are instead.
    other_components: dict = field(default_factory=dict)
    # fp16/bf16 graphs list the matrix multiplies they keep in float32 (attention's), for engines.check.
    lists_float32_matmuls: bool = False
    # The CPU runtime (ONNX Runtime's CPU provider) runs this precision's folders through float32
    # twins (common.cpu_twin). nvfp4 only: torch modules at bf16 would not compute its 4-bit math;
    # fp8 folders keep the torch stand-in their checks were measured with (docs/runtime.md).
    ort_cpu_twin: bool = False

    def __str__(self) -> str:
        return self.name

    @property
    def traced(self) -> Precision:
        """The precision the exporter traces this one at (itself unless a rewrite follows)."""
        return precision(self.traced_as or self.name)

    @property
    def quantized(self) -> bool:
        """Whether the export rewrites the traced graph into Q/DQ form."""
        return self.rewrite is not None

    @property
    def is_float32(self) -> bool:
        return self.compute_dtype == "float32"

    @property
    def ort_cpu_runs(self) -> bool:
        """Whether ONNX Runtime's CPU provider has kernels for this precision's graphs."""
        return self.cpu_check == ORT_CPU

    def of_component(self, component: str, quantized_text_encoder: bool = False) -> Precision:
        """The precision of `component`'s graph in a folder of this precision."""
        if quantized_text_encoder and component == "text_encoder" and self.quantized:
            return self
        return precision(self.other_components.get(component, self.name))

    @property
    def layers_report(self) -> str | None:
        """The export's per-linear report of a quantized precision, under reports/: `fp8_layers.json`."""
        return f"{self.rewrite}_layers.json" if self.quantized else None

    def capability_need(self) -> str:
        """What GPU this precision's engines need, in words: `NVFP4 needs compute capability 10.0 or newer (Blackwell)`."""
        if self.min_compute_capability is None:
            return f"{self.name.upper()} runs on every GPU"
        era = f" ({self.architecture})" if self.architecture else ""
        return f"{self.name.upper()} needs compute capability {self.min_compute_capability} or newer{era}"

    def runs_on(self, capability: tuple[int, int]) -> bool:
        """Whether a GPU of compute capability (major, minor) can run this precision's engines."""
        if self.min_compute_capability is None:
            return True
        major, minor = self.min_compute_capability.split(".")
        return capability >= (int(major), int(minor))

    def torch_dtype(self):
        import torch

        return getattr(torch, self.compute_dtype)


# Bounds against the fp32 PyTorch module on realistic inputs: bf16 keeps 8 mantissa bits, fp16 11;
# errors compound through the layers. The measurements behind them: docs/export.md and docs/fp8.md.
_DECLARED = (
    Precision("fp32", "float32", Tolerance(1e-4, 0.99999), 4, None, ORT_CPU),
    Precision("fp16", "float16", Tolerance(1e-2, 0.9999), 2, "HALF", ORT_CPU, lists_float32_matmuls=True),
    Precision("bf16", "bfloat16", Tolerance(3e-2, 0.999), 2, "BF16", REFERENCE_EVALUATOR, lists_float32_matmuls=True),
    # E4M3 linears in the transformer, everything else bf16 (NVIDIA's Model Optimizer recipe). The
    # bf16 graph is written first and rewritten beside it: 2 + 1 bytes per element at the peak.
    Precision(
        "fp8",
        "bfloat16",
        Tolerance(1e-1, 0.99),
        3,
        "BF16",
        FP32_TWIN,
        traced_as="bf16",
        rewrite="fp8",
        min_compute_capability="8.9",  # FP8 tensor cores start with Ada
        architecture="Ada",
        other_components={"text_encoder": "bf16", "vae": "bf16", "vae_encoder": "bf16"},
    ),
    # NVFP4 linears (E2M1 weights and activations in blocks of 16, E4M3 block scales, fp32 global
    # scales; common/nvfp4.py) in the transformer, the same exclusions as fp8, everything else bf16.
    # The bf16 graph is written first and rewritten beside it: 2 + 0.5625 bytes per element at the peak.
    Precision(
        "nvfp4",
        "bfloat16",
        Tolerance(2.5e-1, 0.97),
        3,
        "BF16",
        FP32_TWIN,
        traced_as="bf16",
        rewrite="nvfp4",
        ort_cpu_twin=True,
        min_compute_capability="10.0",  # FP4 tensor cores start with Blackwell (B200 10.0, RTX 50 12.0)
        architecture="Blackwell",
        # TensorRT-RTX's defaults start at 8.0; measured: it refuses an explicit 8.x for FP4 ("HW-specific
        # datatypes: fp4_e2m1") and drops 8.x from its defaults only in a verbose log line.
        rtx_compute_capabilities=("12.0", "12.1"),
        other_components={"text_encoder": "bf16", "vae": "bf16", "vae_encoder": "bf16"},
    ),
)
PRECISIONS: dict[str, Precision] = {p.name: p for p in _DECLARED}
PRECISION_NAMES: tuple[str, ...] = tuple(PRECISIONS)
DEFAULT = "fp32"
# The bounds by name, for tests and tools that print them.
TOLERANCES: dict[str, Tolerance] = {p.name: p.tolerance for p in _DECLARED}


def precision(name: str | Precision, what: str = "precision") -> Precision:
    """The declaration of `name`; a UsageError naming every precision for anything else."""
    if isinstance(name, Precision):
        return name
    found = PRECISIONS.get(name)
    if found is None:
        raise UsageError(f"unknown {what} {name!r}; choose one of {', '.join(PRECISION_NAMES)}")
    return found
