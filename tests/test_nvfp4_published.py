"""export.nvfp4.published: the published FLUX.2 NVFP4 files, written by comfy-kitchen, read back exactly."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from common import nvfp4
from common.errors import UsageError
from export.nvfp4 import published

torch = pytest.importorskip("torch")
ck = pytest.importorskip("comfy_kitchen")


@pytest.fixture(scope="module")
def tiny_transformer():
    """(config, state dict) of a tiny FLUX.2 [dev] transformer with the tiny checkpoint's dimensions."""
    from diffusers import Flux2Transformer2DModel

    from flux2_tiny.config import DEFAULT as c

    config = dict(
        patch_size=1,
        in_channels=4 * c.latent_channels,
        num_layers=c.num_layers,
        num_single_layers=c.num_single_layers,
        attention_head_dim=c.attention_head_dim,
        num_attention_heads=c.num_attention_heads,
        joint_attention_dim=3 * c.text_hidden_size,
        timestep_guidance_channels=c.timestep_guidance_channels,
        mlp_ratio=c.mlp_ratio,
        axes_dims_rope=c.axes_dims_rope,
        guidance_embeds=c.guidance_embeds,
    )
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**config)
    return dict(model.config), {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def published_files(tiny_transformer, tmp_path_factory):
    from flux2_tiny.nvfp4_file import write_published_nvfp4

    _, state_dict = tiny_transformer
    folder = tmp_path_factory.mktemp("published-nvfp4")
    files = {}
    for variant in ("plain", "mixed"):
        path = folder / f"flux2-dev-nvfp4-{variant}.safetensors"
        write_published_nvfp4(state_dict, path, variant=variant, activation_amax=12.0)
        files[variant] = path
    return files


def comfy_kitchen_reference(path) -> dict:
    """The file as ComfyUI computes it: comfy-kitchen's eager dequantization of each NVFP4 layer (float32),
    named and split by diffusers' converter (a path independent of the reader's)."""
    from comfy_kitchen.registry import registry
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    bfl = {}
    with registry.use_backend("eager"):
        for key, tensor in tensors.items():
            if key.endswith(("weight_scale", "weight_scale_2", "input_scale")):
                continue
            layer = key.removesuffix(".weight")
            if tensor.dtype == torch.uint8:
                bfl[key] = ck.dequantize_nvfp4(
                    tensor, tensors[f"{layer}.weight_scale_2"], tensors[f"{layer}.weight_scale"], torch.float32
                )
            else:
                bfl[key] = tensor
    return convert_flux2_transformer_checkpoint_to_diffusers(bfl)


def bits(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("rows, blocks", [(1, 1), (32, 2), (128, 4), (33, 5), (300, 9), (257, 384)])
def test_unswizzle_inverts_comfy_kitchens_to_blocked(rows, blocks):
    from comfy_kitchen.float_utils import to_blocked

    plain = torch.arange(rows * blocks, dtype=torch.float32).reshape(rows, blocks) % 449  # E4M3 holds 0..448 exactly
    plain = plain.to(torch.float8_e4m3fn)
    tiled = to_blocked(plain, flatten=False)
    assert tuple(tiled.shape) == published.swizzled_scales_shape(rows, blocks)
    back = published.unswizzle_block_scales(tiled.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn), rows, blocks)
    assert np.array_equal(back.view(np.uint8), plain.view(torch.uint8).numpy())


def test_swap_nibbles_turns_comfy_kitchens_packing_into_onnx_order():
    from comfy_kitchen.float_utils import pack_uint4

    codes = np.array([[0x1, 0xF, 0x7, 0x8, 0x0, 0x9]], np.uint8)
    high_first = pack_uint4(torch.from_numpy(codes), hi_first=True).numpy()
    assert high_first.tolist() == [[0x1F, 0x78, 0x09]]  # the published order: even element high
    assert np.array_equal(published.swap_nibbles(high_first), nvfp4.pack(codes))


@pytest.mark.parametrize("variant", ["plain", "mixed"])
def test_every_tensor_reads_back_as_comfy_kitchen_computes_it(variant, published_files, tiny_transformer):
    config, state_dict = tiny_transformer
    reference = comfy_kitchen_reference(published_files[variant])
    transformer = published.read_published(published_files[variant], config)
    assert set(transformer.names) == set(state_dict)  # the diffusers state dict, exactly
    seen = 0
    for tensor in transformer.tensors():
        want = reference[tensor.name]
        if tensor.is_nvfp4:
            got = nvfp4.dequantize(tensor.value)
            assert np.array_equal(bits(got), bits(want.numpy())), tensor.name  # bit for bit
            # The nibbles read the other way round give a far-off weight: a layout error cannot pass.
            swapped = nvfp4.Nvfp4Tensor(
                published.swap_nibbles(tensor.value.codes), tensor.value.block_scales, tensor.value.global_scale
            )
            wrong = nvfp4.dequantize(swapped)
            assert np.linalg.norm(wrong - got) / np.linalg.norm(got) > 0.5, tensor.name
            seen += 1
        else:
            assert tensor.value.dtype == torch.bfloat16
            assert torch.equal(tensor.value, state_dict[tensor.name].to(torch.bfloat16)), tensor.name
    assert seen == len(transformer.nvfp4_names) == {"plain": 20, "mixed": 12}[variant]


def test_static_input_scales_are_where_the_published_files_have_them(published_files, tiny_transformer):
    config, _ = tiny_transformer
    plain = published.read_published(published_files["plain"], config)
    mixed = published.read_published(published_files["mixed"], config)
    assert plain.static_input_layers == plain.nvfp4_layers  # every NVFP4 layer has one
    assert not any("attn" in layer for layer in mixed.nvfp4_layers if layer.startswith("double_blocks"))
    assert sorted(set(mixed.nvfp4_layers) - set(mixed.static_input_layers)) == [
        f"double_blocks.{i}.txt_mlp.{j}" for i in range(2) for j in (0, 2)
    ]
    q = plain.tensor("transformer_blocks.0.attn.to_q.weight")
    assert q.source == "double_blocks.0.img_attn.qkv.weight"
    assert q.input_scale == np.float32(12.0 / 2688)
    assert mixed.tensor("transformer_blocks.0.ff_context.linear_in.weight").input_scale is None


def test_a_config_that_does_not_match_is_refused_naming_the_tensor(published_files, tiny_transformer):
    config, _ = tiny_transformer
    wider_text = dict(config, joint_attention_dim=64)
    with pytest.raises(UsageError, match=r"txt_in\.weight gives diffusers context_embedder\.weight shape \[32, 96\]"):
        published.read_published(published_files["plain"], wider_text)
    deeper = dict(config, num_single_layers=3)
    with pytest.raises(UsageError, match=r"no tensor for diffusers single_transformer_blocks\.2\."):
        published.read_published(published_files["plain"], deeper)
    shallower = dict(config, num_layers=1)
    with pytest.raises(UsageError, match=r"double_blocks\.1\..* is not a tensor of the folder's transformer config"):
        published.read_published(published_files["mixed"], shallower)


def test_a_truncated_file_is_refused_in_one_line(published_files, tiny_transformer, tmp_path):
    config, _ = tiny_transformer
    data = published_files["plain"].read_bytes()
    for cut in (len(data) - 1000, 40):
        truncated = tmp_path / f"cut-{cut}.safetensors"
        truncated.write_bytes(data[:cut])
        with pytest.raises(UsageError, match="truncated or damaged") as caught:
            published.read_published(truncated, config)
        assert "\n" not in str(caught.value) and str(truncated) in str(caught.value)


def test_quantized_tensors_without_the_header_metadata_are_refused(published_files, tiny_transformer, tmp_path):
    from safetensors.torch import load_file, save_file

    config, state_dict = tiny_transformer
    tensors = load_file(str(published_files["plain"]))
    bare = tmp_path / "no-metadata.safetensors"
    save_file(tensors, str(bare))
    with pytest.raises(UsageError, match=r"double_blocks\.0\.img_attn\.proj\.input_scale.*_quantization_metadata"):
        published.read_published(bare, config)
    # A layer the header declares but whose scales are missing.
    partial = tmp_path / "partial.safetensors"
    del tensors["single_blocks.1.linear2.weight_scale"]
    save_file(
        tensors,
        str(partial),
        metadata={"_quantization_metadata": '{"layers": {"single_blocks.1.linear2": {"format": "nvfp4"}}}'},
    )
    with pytest.raises(UsageError, match=r"single_blocks\.1\.linear2 has no single_blocks\.1\.linear2\.weight_scale"):
        published.read_published(partial, config)


def test_a_plain_bf16_single_file_reads_as_plain_tensors(tiny_transformer, tmp_path):
    from safetensors.torch import save_file

    from flux2_tiny.nvfp4_file import bfl_state_dict

    config, state_dict = tiny_transformer
    path = tmp_path / "flux2-dev.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in bfl_state_dict(state_dict).items()}, str(path))
    transformer = published.read_published(path, config)
    assert transformer.nvfp4_layers == () and transformer.nvfp4_names == ()
    modulation = transformer.tensor("norm_out.linear.weight")  # (shift, scale) in the file, (scale, shift) here
    assert modulation.source == "final_layer.adaLN_modulation.1.weight"
    assert torch.equal(modulation.value, state_dict["norm_out.linear.weight"].to(torch.bfloat16))


def test_a_file_saved_under_comfyuis_prefix_reads_the_same(published_files, tiny_transformer, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    config, _ = tiny_transformer
    with safe_open(str(published_files["mixed"]), framework="pt") as handle:
        metadata = handle.metadata()
    prefixed = tmp_path / "prefixed.safetensors"
    tensors = load_file(str(published_files["mixed"]))
    save_file({f"model.diffusion_model.{k}": v for k, v in tensors.items()}, str(prefixed), metadata=metadata)
    original = published.read_published(published_files["mixed"], config)
    moved = published.read_published(prefixed, config)
    assert moved.prefix == "model.diffusion_model." and moved.nvfp4_layers == original.nvfp4_layers
    for a, b in zip(original.tensors(), moved.tensors(), strict=True):
        if a.is_nvfp4:
            assert np.array_equal(a.value.codes, b.value.codes) and a.input_scale == b.input_scale
        else:
            assert torch.equal(a.value, b.value)
