"""The one source of each graph's inputs and outputs: names, shapes and dtypes.

Everything is derived here from a checkpoint's configs (`Geometry`) plus the target image size and
sequence length (`Shapes`). Export traces with these shapes, the verifier feeds them, the runtime
allocates them, TensorRT builds with them, and the manifest records them: nowhere else computes a
token count.

Graph I/O is float32 for every floating tensor at every precision (int64 for token ids and mask):
the cast to the compute precision happens inside the graph, exactly where the PyTorch module does
it (`timestep.to(hidden_states.dtype)` in the transformer, for example), so the runtime and the
sampler are precision-agnostic and the Euler update stays in float32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from common.family import Family

COMPONENTS = ("text_encoder", "transformer", "vae")
# The graphs whose shapes follow the image size: one per exported resolution (`Shapes.resolutions`).
# The first-block step cache (`python -m export --step-cache`, docs/cache.md): the transformer once
# more as three graphs, beside the full one, that share its weights file. `transformer_head` runs the
# embedders and the first double block, `transformer_tail` the rest, `transformer_out` only norm_out
# and proj_out on the first block's output plus a kept tail residual (the steps the cache skips).
STEP_CACHE_COMPONENTS = ("transformer_head", "transformer_tail", "transformer_out")
RESOLUTION_COMPONENTS = ("transformer", "vae", *STEP_CACHE_COMPONENTS)


def graph_name(component: str, shapes: Shapes, height: int, width: int) -> str:
    """The manifest name (and file stem) of `component`'s graph at height x width: the component itself at
    the first exported size, `<component>_<H>x<W>` at the others."""
    if component not in RESOLUTION_COMPONENTS or (height, width) == shapes.sizes[0]:
        return component
    return f"{component}_{height}x{width}"


# Only artifacts exported with reference images (`Shapes.reference_images` > 0) have this graph.
EDITING_COMPONENTS = ("vae_encoder",)

# Defaults live here and only here.
DEFAULT_HEIGHT = 1024
DEFAULT_WIDTH = 1024
DEFAULT_MAX_SEQUENCE_LENGTH = 512


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: "float32" | "int64"


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Shapes:
    """What the deployment fixes: image size, prompt length, batch."""

    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    batch_size: int = 1
    # Image editing: K reference images, each of reference_height x reference_width pixels (0:
    # the output size). K = 0 is text-to-image, and then these fields are left out of the JSON so
    # that text-to-image manifests and cache keys stay what they were.
    reference_images: int = 0
    reference_height: int = 0
    reference_width: int = 0
    # LoRA slots (`--lora-rank R`, docs/lora.md): each transformer block linear in `lora_targets`,
    # (module path, in_features, out_features), takes factors A [R, in] and B [out, R] as graph inputs.
    # Rank 0 has no slots, and then these fields are left out of the JSON like the reference ones.
    lora_rank: int = 0
    lora_targets: tuple[tuple[str, int, int], ...] = ()
    # Several image sizes from one folder (`--resolutions`, docs/export.md): every (height, width) the
    # transformer and VAE graphs were exported at, the first being (height, width). Empty: that one size
    # (and then left out of the JSON).
    resolutions: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        # As JSON reads them back: lists into the tuples that compare equal to the exported ones.
        object.__setattr__(self, "lora_targets", tuple((str(m), int(k), int(n)) for m, k, n in self.lora_targets))
        object.__setattr__(self, "resolutions", tuple((int(h), int(w)) for h, w in self.resolutions))

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """Every exported (height, width), the default first."""
        return self.resolutions or ((self.height, self.width),)

    def at(self, height: int, width: int) -> Shapes:
        """These shapes at one of the exported sizes (the graphs of that size are read with them)."""
        return replace(self, height=height, width=width)

    @property
    def reference_size(self) -> tuple[int, int]:
        """(height, width) of each reference image."""
        return (self.reference_height or self.height, self.reference_width or self.width)

    def to_json(self) -> dict:
        data = asdict(self)
        if not self.reference_images:
            for name in ("reference_images", "reference_height", "reference_width"):
                data.pop(name)
        if not self.lora_rank:
            for name in ("lora_rank", "lora_targets"):
                data.pop(name)
        else:
            data["lora_targets"] = [list(target) for target in self.lora_targets]
        if len(self.resolutions) <= 1:
            data.pop("resolutions")
        else:
            data["resolutions"] = [list(size) for size in self.resolutions]
        return data


@dataclass(frozen=True)
class Geometry:
    """What the checkpoint fixes, read from its configs."""

    pipeline_class: str
    text_hidden_size: int
    text_out_layers: tuple[int, ...]
    text_num_layers: int
    in_channels: int  # transformer input channels = 4 x VAE latent channels (2x2 patchify)
    out_channels: int
    joint_attention_dim: int
    guidance_embeds: bool
    latent_channels: int
    vae_scale_factor: int  # pixels per latent pixel, 2 ** (len(block_out_channels) - 1)
    # klein's step-distilled model (model_index.json "is_distilled"): diffusers runs it without CFG.
    is_distilled: bool = False

    @property
    def pixels_per_token(self) -> int:
        return self.vae_scale_factor * 2  # one packed token covers a 2x2 patch of latents

    def to_json(self) -> dict:
        return {**asdict(self), "text_out_layers": list(self.text_out_layers)}  # as JSON reads it back

    @classmethod
    def from_json(cls, data: dict) -> Geometry:
        return cls(**{**data, "text_out_layers": tuple(data["text_out_layers"])})


def geometry_from_configs(
    model_index: dict,
    text_encoder_config: dict,
    transformer_config: dict,
    vae_config: dict,
    text_out_layers: tuple[int, ...] | None = None,
) -> Geometry:
    """Derive the geometry from the four config dicts of a diffusers FLUX.2 folder."""
    text_config = text_encoder_config.get("text_config", text_encoder_config)
    pipeline_class = model_index.get("_class_name", Family.DEV)
    if text_out_layers is None:
        recorded = model_index.get("_flux2_trt_text_encoder_out_layers")
        text_out_layers = tuple(recorded) if recorded else Family(pipeline_class).default_text_layers
    in_channels = int(transformer_config.get("in_channels", 128))
    return Geometry(
        pipeline_class=pipeline_class,
        text_hidden_size=int(text_config["hidden_size"]),
        text_out_layers=tuple(int(i) for i in text_out_layers),
        text_num_layers=int(text_config["num_hidden_layers"]),
        in_channels=in_channels,
        out_channels=int(transformer_config.get("out_channels") or in_channels),
        joint_attention_dim=int(transformer_config.get("joint_attention_dim", 15360)),
        guidance_embeds=bool(transformer_config.get("guidance_embeds", True)),
        latent_channels=int(vae_config.get("latent_channels", 32)),
        vae_scale_factor=2 ** (len(vae_config.get("block_out_channels", (128, 256, 512, 512))) - 1),
        is_distilled=bool(model_index.get("is_distilled", False)),
    )


def image_tokens(geometry: Geometry, shapes: Shapes) -> int:
    """Packed latent tokens for one image: (H/16) * (W/16) for FLUX.2's 8x VAE and 2x2 patches."""
    step = geometry.pixels_per_token
    return (shapes.height // step) * (shapes.width // step)


def reference_tokens(geometry: Geometry, shapes: Shapes) -> int:
    """Packed tokens of one reference image (0 without references)."""
    if not shapes.reference_images:
        return 0
    height, width = shapes.reference_size
    step = geometry.pixels_per_token
    return (height // step) * (width // step)


def lora_slot_inputs(shapes: Shapes, where=None) -> list[TensorSpec]:
    """The LoRA slots' inputs, two per target linear: `lora_a.<module>` [R, K] and `lora_b.<module>` [N, R].

    Not batched: one LoRA set per call (a CFG pair shares it). Zeros are no LoRA. `where` (a module
    path -> bool) keeps the slots of one part of the transformer (the step cache's graphs).
    """
    rank = shapes.lora_rank
    inputs = []
    for module, in_features, out_features in shapes.lora_targets:
        if where is not None and not where(module):
            continue
        inputs.append(TensorSpec(f"{LORA_A}{module}", (rank, in_features), "float32"))
        inputs.append(TensorSpec(f"{LORA_B}{module}", (out_features, rank), "float32"))
    return inputs


LORA_A, LORA_B = "lora_a.", "lora_b."
# The transformer's blocks, whose linears LoRA slots cover (export/graphs/lora_slots.py); outside them
# (embedders, modulation, norm_out, proj_out) only baking (`--lora` at export) applies a LoRA.
LORA_BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def component_specs(geometry: Geometry, shapes: Shapes) -> dict[str, ComponentSpec]:
    b, seq = shapes.batch_size, shapes.max_sequence_length
    tokens = image_tokens(geometry, shapes)
    text_embed_dim = len(geometry.text_out_layers) * geometry.text_hidden_size
    f32, i64 = "float32", "int64"
    k, per_reference = shapes.reference_images, reference_tokens(geometry, shapes)
    transformer_inputs = [
        TensorSpec("hidden_states", (b, tokens, geometry.in_channels), f32),  # packed noisy latents
    ]
    if k:
        # The K references' tokens, concatenated after the noisy latents' as Flux2Pipeline does
        # every step; the velocity keeps only the first `tokens` rows.
        transformer_inputs.append(TensorSpec("reference_latents", (b, k * per_reference, geometry.in_channels), f32))
    transformer_inputs += [
        TensorSpec("encoder_hidden_states", (b, seq, geometry.joint_attention_dim), f32),  # prompt_embeds
        TensorSpec("timestep", (b,), f32),  # sigma in [0, 1] (diffusers passes t / 1000)
    ]
    if geometry.guidance_embeds:
        transformer_inputs.append(TensorSpec("guidance", (b,), f32))
    transformer_inputs += lora_slot_inputs(shapes)
    specs = {
        "text_encoder": ComponentSpec(
            "text_encoder",
            inputs=(TensorSpec("input_ids", (b, seq), i64), TensorSpec("attention_mask", (b, seq), i64)),
            outputs=(TensorSpec("prompt_embeds", (b, seq, text_embed_dim), f32),),
        ),
        "transformer": ComponentSpec(
            "transformer",
            inputs=tuple(transformer_inputs),
            outputs=(TensorSpec("velocity", (b, tokens, geometry.out_channels), f32),),
        ),
        # The VAE graph takes the sampler's packed latents and does unpacking, BatchNorm
        # de-normalisation, unpatchify and decoding itself: the BN statistics stay with the VAE
        # weights, and the runtime needs no tensor code between the sampler and the image.
        "vae": ComponentSpec(
            "vae",
            inputs=(TensorSpec("packed_latents", (b, tokens, 4 * geometry.latent_channels), f32),),
            outputs=(TensorSpec("image", (b, 3, shapes.height, shapes.width), f32),),  # in [-1, 1]
        ),
    }
    if k:
        ref_height, ref_width = shapes.reference_size
        # The reference images, all K in one call: pixels in [-1, 1] -> encoded (the latent
        # distribution's mode), patchified, BatchNorm-normalised and packed, as
        # Flux2Pipeline._encode_vae_image + _pack_latents.
        specs["vae_encoder"] = ComponentSpec(
            "vae_encoder",
            inputs=(TensorSpec("reference_images", (k, 3, ref_height, ref_width), f32),),
            outputs=(TensorSpec("reference_tokens", (k, per_reference, 4 * geometry.latent_channels), f32),),
        )
    return specs


FIRST_BLOCK = "transformer_blocks.0."
# Outputs that are differences of two streams, {output: the stream it is a residual of}: the numerics
# check judges them as that stream plus the residual, since a difference's own relative error grows with
# the cancellation (FP8 tiny default: first_residual rel L2 0.133 alone, h1 itself 0.031).
RESIDUAL_OF = {"first_residual": "h1", "tail_residual": "h1"}


def in_first_block(module: str) -> bool:
    """The LoRA targets the head graph runs (the first double block's linears); the tail runs the others."""
    return module.startswith(FIRST_BLOCK)


def step_cache_specs(geometry: Geometry, shapes: Shapes, width: int) -> dict[str, ComponentSpec]:
    """The three step-cache graphs' I/O; `width` is the transformer's inner dimension (heads x head_dim).

    The width is not part of `Geometry` (adding it would change every export's cache key); the export
    reads it from the transformer's config, the runtime from the graphs' manifest records.
    """
    full = component_specs(geometry, shapes)["transformer"]
    b, seq, f32 = shapes.batch_size, shapes.max_sequence_length, "float32"
    # N': the noisy latents' tokens and, for editing, the references' after them.
    stream_tokens = image_tokens(geometry, shapes) + shapes.reference_images * reference_tokens(geometry, shapes)
    image = (b, stream_tokens, width)
    plain = tuple(t for t in full.inputs if not t.name.startswith((LORA_A, LORA_B)))
    h1, txt1, temb = (
        TensorSpec("h1", image, f32),
        TensorSpec("txt1", (b, seq, width), f32),
        TensorSpec("temb", (b, width), f32),
    )
    residual = TensorSpec("tail_residual", image, f32)
    velocity = full.outputs[0]
    tail_slots = lora_slot_inputs(shapes, lambda module: not in_first_block(module))
    return {
        "transformer_head": ComponentSpec(
            "transformer_head",
            inputs=plain + tuple(lora_slot_inputs(shapes, in_first_block)),
            outputs=(h1, txt1, TensorSpec("first_residual", image, f32), temb),
        ),
        "transformer_tail": ComponentSpec(
            "transformer_tail", inputs=(h1, txt1, temb, *tail_slots), outputs=(velocity, residual)
        ),
        "transformer_out": ComponentSpec("transformer_out", inputs=(h1, residual, temb), outputs=(velocity,)),
    }
