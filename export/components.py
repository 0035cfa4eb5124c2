"""One declaration per exportable graph: where its weights live and how its module is made.

Each `Component` says which checkpoint folder holds its weights, how its model is built (loaded
with weights for the plain path, empty for streaming), which wrapper turns that model into the
graph's module (`export/graphs/`) and under which attribute the wrapper keeps it (so the prefix
of the graph's initializer names), which reference inputs check it, and whether the quantizing
rewrites (FP8 linears) apply. Names, shapes and dtypes of each graph's inputs and outputs stay in
`common/specs.py`, the one source every package reads.

Export, streaming, the FP8 rewrite and the numerics check read these records; none of them asks
`if component == ...`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.precision import Precision
from common.precision import precision as declared
from common.specs import STEP_CACHE_COMPONENTS, ComponentSpec, Geometry, Shapes, lora_slot_inputs
from export import checkpoint as ckpt


@dataclass(frozen=True)
class Component:
    name: str
    weights_folder: str  # the checkpoint subfolder its weights come from
    wrapper_attribute: str  # where the model sits inside its graph module: the initializer names' prefix
    load: Callable  # (checkpoint, geometry, torch dtype) -> the model with its weights
    empty: Callable  # (checkpoint, geometry, torch dtype) -> (the model without weights, checkpoint key rename)
    wrap: Callable  # (model, geometry, shapes) -> the exportable graph module
    feeds: Callable  # (export.verify.reference.ReferenceInputs, spec) -> the inputs the check runs
    quantizable: bool = False  # the quantizing rewrites (FP8 linears) apply to its nn.Linear layers
    # Its graph can stand in for the pipeline's own module: a quantized one is also checked end to
    # end, as an image through diffusers' pipeline.
    drives_pipeline: bool = False
    # A graph of another component's model (the step cache's transformer parts): its quantization
    # (calibration, exclusions) is that component's, and its weights are that graph's (shared).
    part_of: str = ""

    @property
    def model_component(self) -> str:
        """The component whose model this graph runs: itself, or the one it is a part of."""
        return self.part_of or self.name

    @property
    def initializer_prefix(self) -> str:
        return self.wrapper_attribute + "."

    def weights_dir(self, checkpoint: ckpt.Checkpoint):
        return checkpoint.component_dir(self.weights_folder)

    def graph_module(self, checkpoint: ckpt.Checkpoint, geometry: Geometry, shapes: Shapes, precision: str | Precision):
        """The exportable module with its weights, computing in `precision`'s dtype."""
        model = self.load(checkpoint, geometry, declared(precision).torch_dtype())
        return self.wrap(model, geometry, shapes).eval()


# ---------------------------------------------------------------------------------------------
# Models without weights, constructed as `from_pretrained` constructs them (streaming export)


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _rename_language_model_key(key: str) -> str:
    # As transformers applies `key_mapping` in `checkpoint.load_language_model`: each pattern in
    # turn, on the result of the previous one.
    for pattern in ckpt.LANGUAGE_MODEL_PREFIXES:
        key = re.sub(pattern, "", key, count=1)
    return key


def _empty_language_model(checkpoint: ckpt.Checkpoint, geometry: Geometry, dtype):
    from accelerate import init_empty_weights
    from transformers import AutoModel

    config = ckpt.language_model_config(checkpoint, geometry)
    with init_empty_weights(include_buffers=False):
        return AutoModel.from_config(config, dtype=dtype), _rename_language_model_key


def _empty_diffusers(class_name: str, folder: str):
    def empty(checkpoint: ckpt.Checkpoint, geometry: Geometry, dtype):
        import diffusers
        from accelerate import init_empty_weights

        cls = getattr(diffusers, class_name)
        config = cls.load_config(checkpoint.component_dir(folder))
        with _default_dtype(dtype), init_empty_weights(include_buffers=False):
            return cls.from_config(config), None

    return empty


# ---------------------------------------------------------------------------------------------
# The wrappers (export/graphs/). They import torch, so they are imported when a graph is made: the
# command lines answer --help and refuse a bad request without loading torch.


def _text_encoder_graph(model, geometry: Geometry, shapes: Shapes):
    from export.graphs.text_encoder import TextEncoderGraph

    return TextEncoderGraph(model, geometry.text_out_layers)


def _load_transformer(checkpoint: ckpt.Checkpoint, geometry: Geometry, dtype):
    """The transformer with its weights; for the fp16 graph loaded at float32 and row-scaled into float16
    (`export.graphs.fp16_linear`), so that weights past 65504 are scaled before they are cast."""
    import torch

    from export.graphs import transformer

    if dtype != torch.float16 or not transformer.FP32_STREAM:
        return ckpt.load_transformer(checkpoint, dtype)
    from export.graphs.fp16_linear import prescale_loaded

    return prescale_loaded(ckpt.load_transformer(checkpoint, torch.float32), dtype)


def _transformer_graph(model, geometry: Geometry, shapes: Shapes):
    from export.graphs.transformer import transformer_graph

    return transformer_graph(model, geometry, shapes)


def _step_cache_graph(part: str):
    def wrap(model, geometry: Geometry, shapes: Shapes):
        from export.graphs.step_cache import step_cache_graph

        return step_cache_graph(part, model, geometry, shapes)

    return wrap


def _vae_decoder_graph(model, geometry: Geometry, shapes: Shapes):
    from export.graphs.vae import VaeDecoderGraph

    return VaeDecoderGraph(model, geometry, shapes)


def _vae_encoder_graph(model, geometry: Geometry, shapes: Shapes):
    from export.graphs.vae_encoder import VaeEncoderGraph

    return VaeEncoderGraph(model, geometry, shapes)


# ---------------------------------------------------------------------------------------------
# Reference inputs of each graph (export.verify.reference.ReferenceInputs holds the shared ones)


def _text_encoder_feeds(inputs, spec: ComponentSpec) -> dict[str, np.ndarray]:
    ids, mask = inputs.token_inputs()
    return {"input_ids": ids, "attention_mask": mask}


def _transformer_feeds(inputs, spec: ComponentSpec) -> dict[str, np.ndarray]:
    rng = inputs.rng()
    b = inputs.shapes.batch_size
    feeds = {"hidden_states": rng.standard_normal(spec.inputs[0].shape).astype(np.float32)}
    if inputs.shapes.reference_images:
        feeds["reference_latents"] = rng.standard_normal(spec.inputs[1].shape).astype(np.float32)
    feeds |= {"encoder_hidden_states": inputs.prompt_embeds(), "timestep": np.full((b,), inputs.sigma, np.float32)}
    if inputs.geometry.guidance_embeds:
        feeds["guidance"] = np.full((b,), inputs.guidance, np.float32)
    # LoRA slots: random factors, so that the check exercises every branch (zeros would test none).
    for slot in lora_slot_inputs(inputs.shapes):
        feeds[slot.name] = (0.05 * rng.standard_normal(slot.shape)).astype(np.float32)
    return feeds


def _step_cache_feeds(inputs, spec: ComponentSpec) -> dict[str, np.ndarray]:
    """The transformer's check inputs and the fp32 model's own streams between the graphs (h1, txt1, temb,
    tail_residual: `ReferenceInputs.step_cache_streams`)."""
    streams = inputs.step_cache_streams()
    return {t.name: streams[t.name] for t in spec.inputs}


def _vae_feeds(inputs, spec: ComponentSpec) -> dict[str, np.ndarray]:
    return {"packed_latents": inputs.rng().standard_normal(spec.inputs[0].shape).astype(np.float32)}


def _vae_encoder_feeds(inputs, spec: ComponentSpec) -> dict[str, np.ndarray]:
    return {"reference_images": inputs.reference_images(spec.inputs[0].shape)}


_VAE_DECODER = Component(
    "vae",
    weights_folder="vae",
    wrapper_attribute="vae",
    load=lambda checkpoint, geometry, dtype: ckpt.load_vae(checkpoint, dtype),
    empty=_empty_diffusers("AutoencoderKLFlux2", "vae"),
    wrap=_vae_decoder_graph,
    feeds=_vae_feeds,
)
_TRANSFORMER = Component(
    "transformer",
    weights_folder="transformer",
    wrapper_attribute="model",
    load=_load_transformer,
    empty=_empty_diffusers("Flux2Transformer2DModel", "transformer"),
    wrap=_transformer_graph,
    feeds=_transformer_feeds,
    quantizable=True,
    drives_pipeline=True,
)
COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component(
            "text_encoder",
            weights_folder="text_encoder",
            wrapper_attribute="language_model",
            load=ckpt.load_language_model,
            empty=_empty_language_model,
            wrap=_text_encoder_graph,
            feeds=_text_encoder_feeds,
            quantizable=True,  # with --text-encoder-precision fp8
        ),
        _TRANSFORMER,
        # `--step-cache`: the transformer cut in three (export/graphs/step_cache.py), its weights shared.
        *(
            dataclasses.replace(
                _TRANSFORMER,
                name=part,
                wrap=_step_cache_graph(part),
                feeds=_step_cache_feeds,
                drives_pipeline=False,
                part_of="transformer",
            )
            for part in STEP_CACHE_COMPONENTS
        ),
        _VAE_DECODER,
        # Image editing: the VAE's encoder, from the same vae/ weights.
        dataclasses.replace(_VAE_DECODER, name="vae_encoder", wrap=_vae_encoder_graph, feeds=_vae_encoder_feeds),
    )
}
