from common.specs import Shapes, component_specs, geometry_from_configs, image_tokens

DEV_CONFIGS = (
    {"_class_name": "Flux2Pipeline"},
    {"text_config": {"hidden_size": 5120, "num_hidden_layers": 40}},
    {"in_channels": 128, "joint_attention_dim": 15360, "guidance_embeds": True},
    {"latent_channels": 32, "block_out_channels": [128, 256, 512, 512]},
)


def test_flux2_dev_geometry_gives_the_published_shapes():
    geometry = geometry_from_configs(*DEV_CONFIGS)
    specs = component_specs(geometry, Shapes())
    assert geometry.text_out_layers == (10, 20, 30)
    assert specs["text_encoder"].outputs[0].shape == (1, 512, 15360)
    assert specs["transformer"].inputs[0].shape == (1, 4096, 128)
    assert [t.name for t in specs["transformer"].inputs] == [
        "hidden_states",
        "encoder_hidden_states",
        "timestep",
        "guidance",
    ]
    assert specs["vae"].inputs[0].shape == (1, 4096, 128)
    assert specs["vae"].outputs[0].shape == (1, 3, 1024, 1024)


def test_shapes_follow_size_and_configs():
    model_index, text, transformer, vae = DEV_CONFIGS
    geometry = geometry_from_configs(
        {"_class_name": "Flux2KleinPipeline"},
        {"hidden_size": 2560, "num_hidden_layers": 36},
        {**transformer, "joint_attention_dim": 7680, "guidance_embeds": False},
        vae,
    )
    shapes = Shapes(height=768, width=1360, max_sequence_length=256, batch_size=2)
    specs = component_specs(geometry, shapes)
    assert geometry.text_out_layers == (9, 18, 27)
    assert image_tokens(geometry, shapes) == 48 * 85
    assert specs["text_encoder"].outputs[0].shape == (2, 256, 3 * 2560)
    assert "guidance" not in [t.name for t in specs["transformer"].inputs]
    assert specs["vae"].outputs[0].shape == (2, 3, 768, 1360)


def test_spec_json_round_trip():
    """The manifest records each graph's I/O as JSON; read back, it is the declaration again."""
    import json

    from common.manifest import tensors_from_json, tensors_to_json

    specs = component_specs(geometry_from_configs(*DEV_CONFIGS), Shapes())
    for spec in specs.values():
        for tensors in (spec.inputs, spec.outputs):
            assert tensors_from_json(json.loads(json.dumps(tensors_to_json(tensors)))) == tensors
