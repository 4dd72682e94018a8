"""The network driven through the calls sd-scripts' train_network.py makes, in its order
(REFERENCE §3), on an SD1-layout and two SDXL-layout models, 3 optimiser steps per algo."""

import argparse

import pytest
import torch

import networks.tlora as tlora
from networks.tlora_layer import active_rank_count
from netutil import ALGOS, inputs, make_layout, network_args


def sd_scripts_sequence(layout, algo, tmp_path, steps=3, timesteps=None, gradient_checkpointing=False):
    """Mirror train_network.py: create_network (strings + injected dropout) -> prepare_network ->
    apply_to(te, unet, True, True) -> enable_gradient_checkpointing -> prepare_optimizer_params_with_multiple_te_lrs
    -> prepare_grad_etc -> on_epoch_start -> per step on_step_start / TE + U-Net forward / backward / step -> save_weights."""
    kwargs = {k: str(v) for k, v in network_args(algo, conv_dim="4", conv_alpha="2").items()}
    kwargs["dropout"] = None  # sd-scripts injects args.network_dropout
    network = tlora.create_network(1.0, 8, 4, None, layout.text_encoder_arg(), layout.unet, neuron_dropout=None, **kwargs)
    network.prepare_network(argparse.Namespace(save_model_as="safetensors"))
    network.apply_to(layout.text_encoder_arg(), layout.unet, True, True)
    if gradient_checkpointing:  # sd-scripts: the U-Net checkpoints (in train mode), then the network hook
        layout.unet.train()
        if layout_name_of(layout) == "sgm":
            layout.unet.set_gradient_checkpointing(True, reentrant=True)
        else:
            layout.unet.enable_gradient_checkpointing()
        network.enable_gradient_checkpointing()
    te_lrs = [1e-3, 2e-3]
    groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs(te_lrs, 3e-3, 4e-3)
    check_groups(network, layout, groups, descriptions, te_lrs, 3e-3)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    network.prepare_grad_etc(layout.text_encoder_arg(), layout.unet)
    network.on_epoch_start(layout.text_encoder_arg(), layout.unet)

    trainable_before = {k: v.detach().clone() for k, v in network.named_parameters()}
    frozen_before = {k: v.detach().clone() for k, v in network.named_buffers()}
    grads = []
    losses = []
    for step in range(steps):
        network.on_step_start(layout.text_encoder_arg(), layout.unet)
        x, ids = inputs(seed=step)
        t = torch.randint(0, 1000, (x.shape[0],)) if timesteps is None else timesteps
        context = layout.encode(ids)
        prediction = layout.call(x, t, context)
        loss = torch.nn.functional.mse_loss(prediction, torch.randn_like(prediction))
        optimizer.zero_grad()
        loss.backward()
        grads.append({k: None if v.grad is None else v.grad.detach().clone() for k, v in network.named_parameters()})
        optimizer.step()
        losses.append(loss.item())
    # sd-scripts clips the gradients of get_trainable_params(): exactly the parameters that train
    trained = {id(p) for group in groups for p in group["params"]}
    assert {id(p) for p in network.get_trainable_params()} == trained
    network.save_weights(str(tmp_path / "out.safetensors"), None, {"ss_network_module": "networks.tlora"})
    return network, losses, grads, trainable_before, frozen_before


def layout_name_of(layout):
    return layout.name


def check_groups(network, layout, groups, descriptions, te_lrs, unet_lr):
    """The optimizer groups partition the network's trainable parameters: every one in exactly
    one group, text encoder i's layers with te_lrs[i] (SD1: the first), the U-Net's with unet_lr,
    the frozen copies in none; one description per group, as sd-scripts' logger expects."""
    assert len(descriptions) == len(groups)
    seen = {}
    for group, description in zip(groups, descriptions):
        for param in group["params"]:
            assert id(param) not in seen, "a parameter is in two groups"
            seen[id(param)] = (group["lr"], description)
    expected = {}
    te_prefixes = sorted({layer.lora_name.split("_")[1] for layer in network.text_encoder_loras})
    for layer in network.loras:
        if layer in network.unet_loras:
            lr, label = unet_lr, "unet"
        else:
            index = te_prefixes.index(layer.lora_name.split("_")[1])
            lr, label = te_lrs[index], "textencoder" if len(te_prefixes) == 1 else f"textencoder {index + 1}"
        for name, param in layer.named_parameters():
            expected[id(param)] = (lr, label)
    assert seen == expected
    frozen = {id(b) for b in network.buffers()}
    assert not frozen & set(seen)


@pytest.mark.parametrize("layout_name", ["sd1", "sgm", "sdxl"])
@pytest.mark.parametrize("algo", ALGOS)
def test_three_steps_like_train_network(layout_name, algo, tmp_path):
    layout = make_layout(layout_name)
    network, losses, grads, before, frozen_before = sd_scripts_sequence(layout, algo, tmp_path)
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = [k for k, v in network.named_parameters() if not torch.equal(v.detach(), before[k])]
    # every U-Net layer's factors move (the SD1 mid block sees one token at 8x8/4: q/k get no gradient)
    assert len(moved) >= 0.8 * len(before), f"only {len(moved)} of {len(before)} parameters moved"
    for key, value in network.named_buffers():
        assert torch.equal(value, frozen_before[key]), f"frozen {key} changed"
    assert (tmp_path / "out.safetensors").exists()
    if algo in ("tlora", "ortho"):
        assert any("svd_lambda_base" in k for k in frozen_before)


@pytest.mark.parametrize("layout_name", ["sd1", "sgm"])
@pytest.mark.parametrize("algo", ["tlora", "tlora_vanilla"])
def test_masked_ranks_get_zero_gradient(layout_name, algo, tmp_path):
    layout = make_layout(layout_name)
    timesteps = torch.tensor([999, 700])  # per-sample: the largest active rank count bounds the gradient
    network, _, grads, _, _ = sd_scripts_sequence(layout, algo, tmp_path, steps=1, timesteps=timesteps)
    grad = grads[0]
    checked = 0
    for layer in network.unet_loras:
        active = int(active_rank_count(timesteps, layer.rank, layer.min_rank).max())
        assert active < layer.rank
        for role in ("down", "up", "lambda"):
            key = layer.keys.get(role)
            if key is None:
                continue
            g = grad[f"{layer.lora_name}.{key}"]
            if g is None:
                continue
            rank_axis = 1 if role == "up" else 0
            masked = g.narrow(rank_axis, active, layer.rank - active)
            assert torch.count_nonzero(masked) == 0, f"{layer.lora_name}.{key}: masked ranks got gradient"
            if g.abs().sum() > 0:
                assert torch.count_nonzero(g.narrow(rank_axis, 0, active)) > 0
                checked += 1
    assert checked > 10
    # text encoder layers are not masked: their gradient reaches every rank
    full = [layer for layer in network.text_encoder_loras if grad[f"{layer.lora_name}.{layer.keys['up']}"] is not None]
    assert full and any(
        torch.count_nonzero(grad[f"{l.lora_name}.{l.keys['up']}"][:, l.rank - 1]) > 0 for l in full
    )


def test_train_unet_only_drops_text_encoder_layers(tmp_path):
    layout = make_layout("sgm")
    network = tlora.create_network(1.0, 8, 8, None, layout.text_encoders, layout.unet, algo="tlora", dropout=None)
    assert network.text_encoder_loras
    network.apply_to(layout.text_encoders, layout.unet, False, True)
    assert not network.text_encoder_loras
    assert not any(k.startswith("lora_te") for k in network.state_dict())
    groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs(None, 1e-4, 1e-4)
    assert descriptions == ["unet"]
    network.save_weights(str(tmp_path / "u.safetensors"), torch.float16, {})
    loaded, sd = tlora.create_network_from_weights(1.0, str(tmp_path / "u.safetensors"), None, layout.text_encoders, layout.unet)
    assert not loaded.text_encoder_loras and len(loaded.unet_loras) == len(network.unet_loras)
    assert all(v.dtype == torch.float16 for v in sd.values())


@pytest.mark.parametrize("layout_name", ["sd1", "sgm"])
def test_gradient_checkpointing_run_gives_the_same_steps(layout_name, tmp_path):
    """The same three sd-scripts steps with the U-Net checkpointing: identical losses and
    gradients (the recomputed layers see the mask of their own forward)."""
    torch.manual_seed(0)
    plain = sd_scripts_sequence(make_layout(layout_name), "tlora", tmp_path, timesteps=torch.tensor([900, 40]))
    torch.manual_seed(0)
    checkpointed = sd_scripts_sequence(make_layout(layout_name), "tlora", tmp_path, timesteps=torch.tensor([900, 40]),
                                       gradient_checkpointing=True)
    _, losses_a, grads_a, _, _ = plain
    _, losses_b, grads_b, _, _ = checkpointed
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    compared = 0
    for step_a, step_b in zip(grads_a, grads_b):
        for key, grad in step_a.items():
            if grad is None:
                assert step_b[key] is None
                continue
            torch.testing.assert_close(step_b[key], grad, rtol=1e-4, atol=1e-7, msg=key)
            compared += 1
    assert compared > 30
