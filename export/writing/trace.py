"""Trace a module with torch's dynamo ONNX exporter and write it with its weights in one file beside it."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from common.errors import InternalError
from common.onnx_checks import dynamic_dims, external_data_files, float64_uses
from common.specs import ComponentSpec

# TensorRT 10.x and 11.x parse opsets up to 22+; 20 is what torch's exporter emits natively here
# and is >= 19, which FP8 QuantizeLinear/DequantizeLinear need.
OPSET = 20


def data_file_name(onnx_name: str) -> str:
    return onnx_name + ".data"


def example_inputs(spec: ComponentSpec) -> tuple:
    """Zeros of the declared shapes and dtypes: tracing records shapes, never values (the graphs
    traced on zeros and on the numerics check's real inputs are identical, node for node)."""
    import torch

    return tuple(torch.zeros(t.shape, dtype=getattr(torch, t.dtype)) for t in spec.inputs)


def trace(module, example_args, spec: ComponentSpec, *, optimize: bool):
    """torch's dynamo exporter on `module`, quietly; returns the ONNXProgram (not yet saved)."""
    import torch

    module.eval()
    captured = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(captured), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            module,
            tuple(example_args),
            dynamo=True,
            opset_version=OPSET,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            external_data=True,
            optimize=optimize,
        )


def export_graph(module, example_args, spec: ComponentSpec, path: Path) -> dict:
    """Export `module` to `path` (+ `path.data`), check it, and return facts for the manifest."""
    program = trace(module, example_args, spec, optimize=True)
    program.save(str(path), external_data=True)
    del program
    return check_graph(path, spec)


def check_graph(path: Path, spec: ComponentSpec) -> dict:
    """Refuse a written graph that TensorRT could not take; return facts for the manifest."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    problems = []
    problems += [f"float64 at {p}" for p in float64_uses(model)]
    problems += [f"dynamic shape: {p}" for p in dynamic_dims(model)]
    got_inputs = [value.name for value in model.graph.input]
    if got_inputs != [t.name for t in spec.inputs]:
        problems.append(f"inputs {got_inputs} differ from the declaration {[t.name for t in spec.inputs]}")
    for value, declared in zip(model.graph.output, spec.outputs):
        shape = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
        if shape != declared.shape:
            problems.append(f"output {value.name} has shape {shape}, declared {declared.shape}")
    data_files = external_data_files(model)
    if data_files - {data_file_name(path.name)}:
        problems.append(f"external data in {sorted(data_files)}, expected only {data_file_name(path.name)}")
    if problems:
        raise InternalError(f"exported {spec.name} graph {path} is not deployable: {'; '.join(problems)}")
    onnx.checker.check_model(str(path), full_check=False)
    return {"opset": OPSET, "nodes": len(model.graph.node)}
