"""Streaming export (export/streaming.py): the plain path's graph, from real checkpoint layouts, reading only what it needs.

`export_tiny` (conftest) exports by the default path, which is the streaming one.
"""

import hashlib
import json
import re
import shutil

import numpy as np
import onnx
import pytest

from common.manifest import sha256_file
from common.specs import COMPONENTS, component_specs


def _graph(path):
    """The node list (op, inputs, outputs) and the initializers' contents, name-blind."""
    model = onnx.load(str(path))
    nodes = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    contents = sorted(
        (t.data_type, tuple(t.dims), hashlib.sha256(onnx.numpy_helper.to_array(t).tobytes()).hexdigest())
        for t in model.graph.initializer
    )
    return nodes, contents


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, small_shapes):
    from export.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(tiny_checkpoint)
    geometry = checkpoint.geometry()
    return checkpoint, geometry, component_specs(geometry, small_shapes)


@pytest.mark.parametrize("precision, components", [("fp16", COMPONENTS), ("bf16", ("transformer",))])
def test_streamed_graph_is_the_plain_paths_graph(export_tiny, tiny, small_shapes, tmp_path, precision, components):
    import onnxruntime as ort

    from export.verify.reference import ReferenceInputs, build_graph_module
    from export.writing.trace import example_inputs, export_graph

    checkpoint, geometry, specs = tiny
    streamed = export_tiny(precision)
    for component in components:
        spec = specs[component]
        plain = tmp_path / f"{component}.onnx"
        module = build_graph_module(component, checkpoint, geometry, small_shapes, precision)
        export_graph(module, example_inputs(spec), spec, plain)
        plain_nodes, plain_weights = _graph(plain)
        nodes, weights = _graph(streamed / f"{component}.onnx")
        assert nodes == plain_nodes, component
        assert weights == plain_weights, component  # same values, bit for bit, after the cast
        if precision == "fp16":
            feeds = ReferenceInputs(checkpoint, geometry, small_shapes).feeds(spec)
            got = ort.InferenceSession(str(streamed / f"{component}.onnx")).run(None, feeds)[0]
            want = ort.InferenceSession(str(plain)).run(None, feeds)[0]
            assert np.array_equal(got, want), (component, float(np.abs(got - want).max()))


def test_weightless_module_is_the_loaded_module(tiny, small_shapes):
    """Same parameters (names, shapes, dtypes) and the same buffer values as `from_pretrained` gives."""
    import torch

    from export.verify.reference import build_graph_module
    from export.writing.streaming import build_weightless_graph

    checkpoint, geometry, _ = tiny
    for component in COMPONENTS:
        hollow = build_weightless_graph(component, checkpoint, geometry, small_shapes, "bf16")
        loaded = build_graph_module(component, checkpoint, geometry, small_shapes, "bf16")
        params = {n: (tuple(p.shape), p.dtype) for n, p in loaded.named_parameters()}
        assert {n: (tuple(p.shape), p.dtype) for n, p in hollow.module.named_parameters()} == params
        assert set(hollow.weights) == set(params)
        buffers = dict(loaded.named_buffers())
        assert set(hollow.buffers) == set(buffers), component
        for name, value in buffers.items():
            assert hollow.buffers[name].dtype == value.dtype, name
            assert torch.equal(hollow.buffers[name], value), name
    # the ones that matter: the VAE's de-normalisation from the checkpoint's BatchNorm statistics
    vae = build_weightless_graph("vae", checkpoint, geometry, small_shapes, "fp32")
    assert float(vae.buffers["bn_mean"].abs().max()) > 0.1


def _sharded_copy(source, target):
    """`source` re-saved sharded: diffusers' own sharded save for the transformer (in bf16, as FLUX.2
    [dev] is published) and the VAE; the text encoder by hand in transformers 5's key layout
    (`model.language_model.*`; the tiny one is saved in the layout FLUX.2 [dev] is published in,
    `language_model.model.*`), vision tower included."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    for component, cls, dtype in (
        ("transformer", Flux2Transformer2DModel, torch.bfloat16),
        ("vae", AutoencoderKLFlux2, torch.float32),
    ):
        model = cls.from_pretrained(source / component, torch_dtype=dtype)
        (target / component / "config.json").unlink()
        model.save_pretrained(target / component, max_shard_size="40KB")
    tensors = {}
    for file in sorted((source / "text_encoder").glob("*.safetensors")):  # one file or the published shards
        tensors.update(load_file(file))
    renamed = {}
    for key, value in tensors.items():
        key = re.sub(r"^language_model\.model\.", "model.language_model.", key)
        key = re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", key)
        renamed[key] = value
    keys = sorted(renamed)
    shards = [keys[i::3] for i in range(3)]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(
            {k: renamed[k].contiguous() for k in shard}, target / "text_encoder" / name, metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in renamed.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    return target


def test_sharded_checkpoint_exports_byte_identically(export_tiny, tiny_checkpoint, small_shapes, tmp_path, monkeypatch):
    from safetensors import safe_open

    from export.checkpoint import weight_files
    from export.run import export_artifacts
    from export.writing import streaming

    sharded = _sharded_copy(tiny_checkpoint, tmp_path / "sharded")
    for component in COMPONENTS:
        assert len(weight_files(sharded / component)) >= 3, component
        assert len(list((sharded / component).glob("*.safetensors.index.json"))) == 1
    with safe_open(str(weight_files(sharded / "transformer")[0]), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}

    read = []
    opened = streaming._open_safetensors

    class Recording:
        def __init__(self, file):
            self.handle = opened(file)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.handle.get_tensor(key)

        def get_slice(self, key):
            handle = self.handle

            class Slice:
                def get_shape(self):
                    return handle.get_slice(key).get_shape()

                def __getitem__(self, index):
                    read.append(key)
                    return handle.get_slice(key)[index]

            return Slice()

    monkeypatch.setattr(streaming, "_open_safetensors", Recording)
    out = tmp_path / "out"
    # at bf16, the bf16-stored transformer (copied straight from the file's pages) must give what
    # the fp32-stored one gives after the cast: rounding to bf16 once is rounding to bf16
    export_artifacts(model=str(sharded), out=out, precision="bf16", shapes=small_shapes, skip_check=True, log=print)
    reference = export_tiny("bf16")
    for component in COMPONENTS:
        for name in (f"{component}.onnx", f"{component}.onnx.data"):
            assert sha256_file(out / name) == sha256_file(reference / name), name

    text_keys = [k for k in read if k.startswith("model.")]
    assert text_keys and all(k.startswith("model.language_model.") for k in text_keys), sorted(set(text_keys))[:5]
    # the tiny text encoder has 8 layers and FLUX.2 reads hidden states (2, 4, 6): the outputs of
    # layers 1, 3, 5. Layers 6 and 7 cannot matter and are not read (6 is traced, then pruned).
    layers = {int(re.match(r"model\.language_model\.layers\.(\d+)\.", k)[1]) for k in text_keys if ".layers." in k}
    assert layers == set(range(6))


def test_chunking_does_not_change_a_byte(export_tiny, tiny, small_shapes, tmp_path, monkeypatch):
    """Tiny chunks make every streamed weight (transposed ones included) cross chunk boundaries."""
    from export.writing import streaming

    checkpoint, geometry, specs = tiny
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 100)
    path = tmp_path / "transformer.onnx"
    hollow = streaming.build_weightless_graph("transformer", checkpoint, geometry, small_shapes, "fp16")
    streaming.export_streaming(hollow, specs["transformer"], path)
    reference = export_tiny("fp16") / "transformer.onnx.data"
    assert sha256_file(tmp_path / "transformer.onnx.data") == sha256_file(reference)
    model = onnx.load(str(path), load_external_data=False)
    # weights above the optimizer's folding limit (8192 elements) are the streamed ones: at 2 bytes
    # each, every one of them was written in more than 160 chunks
    assert max(int(np.prod(t.dims)) for t in model.graph.initializer) > 8192


def test_plain_path_is_still_reachable(export_tiny, tiny_checkpoint, small_shapes, tmp_path):
    from export.run import export_artifacts

    out = tmp_path / "plain"
    export_artifacts(
        model=str(tiny_checkpoint), out=out, precision="fp16", components=("vae",), shapes=small_shapes, stream=False
    )
    report = json.loads((out / "reports" / "export_check.json").read_text())["components"]["vae"]
    assert report["passed"] is True
    # the VAE's initializers come out in the same order both ways: the weights file is the same
    assert sha256_file(out / "vae.onnx.data") == sha256_file(export_tiny("fp16") / "vae.onnx.data")


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [("drop", "has no weight for 1 parameter"), ("reshape", "has shape")])
def test_checkpoint_not_matching_its_config_is_one_line(tiny_checkpoint, small_shapes, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    from common.errors import CheckpointError
    from export.run import export_artifacts

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    files = [f for f in sorted((broken / "transformer").glob("*.safetensors")) if "proj_out.weight" in load_file(f)]
    file = files[0]  # the shard that holds it (the tiny checkpoint is sharded, as published)
    tensors = load_file(file)
    if damage == "drop":
        del tensors["proj_out.weight"]
    else:
        tensors["proj_out.weight"] = tensors["proj_out.weight"][:, :-1].contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=message) as caught:
        export_artifacts(model=str(broken), out=out, components=("transformer",), shapes=small_shapes, skip_check=True)
    assert "proj_out.weight" in str(caught.value) and "\n" not in str(caught.value)
    assert not out.exists()
