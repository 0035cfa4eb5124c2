"""The transformer, VAE and scheduler of a tiny checkpoint: the part every FLUX.2 family shares."""

from __future__ import annotations

from pathlib import Path

from flux2_tiny.config import TinyConfig


def write_image_models(
    out: Path, config: TinyConfig, joint_attention_dim: int, modulation_gain: float = 1.0, qk_norm_gain: float = 1.0
) -> None:
    """The transformer, VAE and scheduler, which every FLUX.2 family shares (seeds from `config.seed`).

    At random initialisation the modulation gates are ~0.05 and attention is nearly uniform
    (q/k are RMS-normalised), so the prompt barely moves the image. Gains above 1 scale the
    modulation weights and the q/k norm weights after the seeded init, which makes prompt and
    guidance visible in the output (see flux2_tiny.klein).
    """
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(config.seed + 1)
    inner = config.num_attention_heads * config.attention_head_dim
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * config.latent_channels,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=config.timestep_guidance_channels,
        mlp_ratio=config.mlp_ratio,
        axes_dims_rope=config.axes_dims_rope,
        guidance_embeds=config.guidance_embeds,
    )
    assert inner == transformer.inner_dim
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            owner = name.rsplit(".", 2)[-2]
            if modulation_gain != 1.0 and "modulation" in name and name.endswith(".weight"):
                param.mul_(modulation_gain)
            if qk_norm_gain != 1.0 and owner in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                param.mul_(qk_norm_gain)
    if config.outlier_scale:
        from flux2_tiny.stress import inject_outliers

        inject_outliers(transformer, config.outlier_scale)
    if config.weight_outlier_peak:
        from flux2_tiny.stress import inject_weight_outliers

        inject_weight_outliers(transformer, config.weight_outlier_peak)
    if config.layout == "published":
        from flux2_tiny.published import save_diffusers_bf16

        save_diffusers_bf16(transformer, out / "transformer")
    else:
        transformer.save_pretrained(out / "transformer", safe_serialization=True)

    torch.manual_seed(config.seed + 2)
    n_blocks = len(config.vae_block_out_channels)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=config.vae_block_out_channels,
        layers_per_block=config.vae_layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.vae_norm_num_groups,
        sample_size=256,
    )
    # Non-trivial BatchNorm statistics, so de-normalisation is actually exercised.
    generator = torch.Generator().manual_seed(config.seed + 3)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.num_features, generator=generator))
        vae.bn.running_var.copy_(0.5 + 1.5 * torch.rand(vae.bn.num_features, generator=generator))
    vae.save_pretrained(out / "vae", safe_serialization=True)

    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    scheduler.save_pretrained(out / "scheduler")


def library_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)
