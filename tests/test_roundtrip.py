"""save_weights -> create_network_from_weights rebuilds the exact network from the file alone;
algo=lora (and tlora_vanilla at full rank) files are standard kohya LoRA files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import networks.tlora as tlora
from netutil import ALGOS, inputs, make_layout, network_args, randomise


def trained_file(layout_name, algo, path, **extra):
    layout = make_layout(layout_name)
    network = tlora.create_network(1.0, 8, 4, None, layout.text_encoder_arg(), layout.unet, **network_args(algo, conv_dim="4", conv_alpha="2", **extra))
    randomise(network, seed=3)
    network.apply_to(layout.text_encoder_arg(), layout.unet)
    network.save_weights(str(path), None, {"ss_network_module": "networks.tlora", "ss_output_name": "x"})
    return layout, network


def outputs(layout, timesteps):
    x, ids = inputs(seed=5)
    results = []
    with torch.no_grad():
        context = layout.encode(ids)
        for t in timesteps:
            results.append(layout.call(x, t, context))
    return results


@pytest.mark.parametrize("layout_name", ["sd1", "sgm"])
@pytest.mark.parametrize("algo", ALGOS)
def test_file_rebuilds_identical_network(layout_name, algo, tmp_path):
    path = tmp_path / "net.safetensors"
    layout, network = trained_file(layout_name, algo, path)
    timesteps = [torch.tensor([999, 999]), torch.tensor([500, 20]), 0]
    expected = outputs(layout, timesteps)

    fresh = make_layout(layout_name)  # same seed: the same base model
    loaded, weights = tlora.create_network_from_weights(1.0, str(path), None, fresh.text_encoder_arg(), fresh.unet)
    assert loaded.config == network.config
    loaded.apply_to(fresh.text_encoder_arg(), fresh.unet)
    got = outputs(fresh, timesteps)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the file changed the model: the comparison is not between two base models
    base = outputs(make_layout(layout_name), timesteps)
    assert not torch.allclose(base[1], expected[1], atol=1e-4)

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["tlora_config"])
    assert config["algo"] == algo and config["rank"] == 8 and metadata["tlora_format_version"] == "1"
    if algo in ("tlora", "tlora_vanilla"):
        linear = [layer for layer in loaded.unet_loras if layer.factor("down").dim() == 2 or layer.kernel_size == (1, 1)]
        assert config["min_rank"] == 3 and linear and all(layer.min_rank == 3 for layer in linear)  # not a default (2 or rank/2)
    assert metadata["ss_output_name"] == "x" and metadata["ss_network_dim"] == "8"


def kohya_merge(layout, path):
    """An independent minimal kohya LoRA reader: W += alpha/rank · up @ down for every layer."""
    modules = {}
    for root_prefix, root in [("lora_unet", layout.unet)] + [
        ("lora_te" if len(layout.text_encoders) == 1 else f"lora_te{i + 1}", te) for i, te in enumerate(layout.text_encoders)
    ]:
        for name, module in root.named_modules():
            if root_prefix.startswith("lora_te") and not hasattr(root, "text_model"):
                name = f"text_model.{name}"  # a kohya loader's CLIP names: transformers 5 dropped this wrapper
            modules[f"{root_prefix}_{name}".replace(".", "_")] = module
    tensors = load_file(str(path))
    names = {k.split(".")[0] for k in tensors}
    with torch.no_grad():
        for name in names:
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            alpha = tensors.get(f"{name}.alpha", torch.tensor(float(down.shape[0]))).item()
            change = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * alpha / down.shape[0]
            modules[name].weight += change.reshape(modules[name].weight.shape)
    return len(names)


@pytest.mark.parametrize("algo,t", [("lora", torch.tensor([700, 50])), ("tlora_vanilla", 0)])
def test_kohya_keys_load_in_a_plain_kohya_reader(algo, t, tmp_path):
    path = tmp_path / "k.safetensors"
    layout, network = trained_file("sd1", algo, path)
    expected = outputs(layout, [t])[0]  # tlora_vanilla at t=0: every rank active
    plain = make_layout("sd1")
    merged = kohya_merge(plain, path)
    assert merged == len(network.loras)
    torch.testing.assert_close(outputs(plain, [t])[0], expected, rtol=1e-4, atol=1e-5)


def test_svd_files_do_not_masquerade_as_kohya(tmp_path):
    path = tmp_path / "t.safetensors"
    trained_file("sd1", "tlora", path)
    keys = load_file(str(path)).keys()
    assert not any("lora_up" in k or "lora_down" in k for k in keys)


def test_plain_kohya_file_without_metadata_loads_as_lora(tmp_path):
    """A kohya file from sd-scripts' own networks.lora (no tlora metadata, per-layer ranks)."""
    layout = make_layout("sd1")
    tensors = {}
    names = []
    for name, module in layout.unet.named_modules():
        if name.endswith("attn1.to_q") or name.endswith("attn2.to_v"):
            lora = f"lora_unet_{name}".replace(".", "_")
            rank = 4 if "attn1" in name else 2
            tensors[f"{lora}.lora_down.weight"] = torch.randn(rank, module.in_features)
            tensors[f"{lora}.lora_up.weight"] = torch.randn(module.out_features, rank)
            tensors[f"{lora}.alpha"] = torch.tensor(1.0)
            names.append(lora)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "plain.safetensors"))
    network, _ = tlora.create_network_from_weights(0.5, str(tmp_path / "plain.safetensors"), None, layout.text_encoders, layout.unet)
    assert network.config.algo == "lora" and sorted(l.lora_name for l in network.loras) == sorted(names)
    for layer in network.loras:
        name = layer.lora_name
        expected = tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"]
        torch.testing.assert_close(layer.delta_weight(), expected)
        assert layer.scale == pytest.approx(1.0 / layer.rank) and layer.multiplier == 0.5


def test_text_encoder_layers_have_sd_scripts_names_under_every_transformers():
    """kohya names of CLIP layers carry `text_model` (what sd-scripts writes and A1111, ComfyUI and
    Forge map), also where transformers 5 builds CLIPTextModel without that wrapper."""
    layout = make_layout("sd1")
    network = tlora.create_network(1.0, 4, 4, None, layout.text_encoder_arg(), layout.unet, algo="lora")
    names = [layer.lora_name for layer in network.text_encoder_loras]
    expected = {f"lora_te_text_model_encoder_layers_{i}_{leaf}" for i in range(2)
                for leaf in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}
    assert set(names) == expected
