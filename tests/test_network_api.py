"""The rest of what sd-scripts calls: optimizer groups, LoRA+, max-norm, merging for the
generation scripts, multiplier, dropouts, and TriLoRA's optional orthogonality penalty."""

import pytest
import torch

import networks.tlora as tlora
from netutil import inputs, make_layout, randomise


def build(layout_name="sgm", **kwargs):
    layout = make_layout(layout_name)
    kwargs.setdefault("algo", "tlora")
    network = tlora.create_network(1.0, 8, 4, None, layout.text_encoder_arg(), layout.unet, **kwargs)
    return layout, network


def test_optimizer_groups_with_two_text_encoder_lrs_and_loraplus():
    layout, network = build(loraplus_lr_ratio="16")
    network.apply_to(layout.text_encoders, layout.unet)
    groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], 1e-4, 1e-3)
    assert descriptions == ["textencoder 1", "textencoder 1 plus", "textencoder 2", "textencoder 2 plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 16e-5, 2e-5, 32e-5, 1e-4, 16e-4])
    ids = lambda g: {id(p) for p in g["params"]}
    all_ids = set().union(*[ids(g) for g in groups])
    assert all_ids == {id(p) for p in network.parameters()}  # every trainable factor, once
    up_ids = {id(l.factor("up")) for l in network.loras}
    assert ids(groups[5]) == {id(l.factor("up")) for l in network.unet_loras} and ids(groups[4]).isdisjoint(up_ids)
    # kohya semantics: lr 0 skips a group; None falls back to the default lr
    groups, descriptions = network.prepare_optimizer_params(0, None, 1e-3)
    assert descriptions == ["unet", "unet plus"] and groups[0]["lr"] == 1e-3


def test_max_norm_regularization_scales_change_to_the_limit():
    for algo in ("tlora", "lora"):
        layout, network = build(algo=algo)
        randomise(network)
        before = {l.lora_name: (l.delta_weight() * l.scale).norm().item() for l in network.loras}
        limit = sorted(before.values())[len(before) // 2]
        keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(limit, "cpu")
        after = {l.lora_name: (l.delta_weight() * l.scale).norm().item() for l in network.loras}
        assert keys_scaled == sum(1 for v in before.values() if v > limit)
        for name in before:
            assert after[name] == pytest.approx(min(before[name], limit), rel=1e-4)
        assert max_norm == pytest.approx(limit, rel=1e-4)


@pytest.mark.parametrize("algo", ["tlora", "trilora", "lora"])
def test_merge_to_equals_forward_with_all_ranks(algo, tmp_path):
    layout, network = build("sd1", algo=algo, conv_dim="4")
    randomise(network)
    network.apply_to(layout.text_encoder_arg(), layout.unet)
    x, ids = inputs()
    with torch.no_grad():
        expected = layout.call(x, torch.tensor([0, 0]), layout.encode(ids))  # t=0: all ranks
    network.save_weights(str(tmp_path / "m.safetensors"), None, {})

    fresh = make_layout("sd1")
    merger, weights = tlora.create_network_from_weights(1.0, str(tmp_path / "m.safetensors"), None, fresh.text_encoders, fresh.unet, for_inference=True)
    assert merger.is_mergeable()
    merger.merge_to(fresh.text_encoders, fresh.unet, weights, torch.float32, "cpu")
    with torch.no_grad():
        got = fresh.call(x, torch.tensor([0, 0]), fresh.encode(ids))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_pre_calculation_backup_and_restore():
    layout, network = build("sd1", algo="ortho")
    randomise(network)
    network.apply_to(layout.text_encoders, layout.unet)
    x, ids = inputs()
    with torch.no_grad():
        context = layout.encode(ids)
        applied = layout.call(x, 10, context)
        network.backup_weights()
        network.pre_calculation()
        merged = layout.call(x, 10, context)
        network.restore_weights()
        restored = layout.call(x, 10, context)
        network.set_enabled(False)
        base = layout.call(x, 10, context)
    torch.testing.assert_close(merged, applied, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(restored, applied, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(base, applied, atol=1e-4)


def test_set_multiplier_scales_the_change():
    layout, network = build("sd1", algo="trilora")
    randomise(network)
    network.apply_to(layout.text_encoders, layout.unet)
    layer = next(l for l in network.unet_loras if not l.is_conv)
    features = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        base = layer.org_forward(features)
        full = layer(features) - base
        network.set_multiplier(0.25)
        quarter = layer(features) - base
    torch.testing.assert_close(quarter, full * 0.25, rtol=1e-5, atol=1e-6)


def test_dropouts_keep_ortho_forms_zero_change_at_init():
    layout, network = build("sd1", algo="tlora", dropout="0.5", rank_dropout="0.5", module_dropout="0.2")
    network.apply_to(layout.text_encoders, layout.unet)
    network.train()
    layer = next(l for l in network.unet_loras if not l.is_conv)
    features = torch.randn(2, 5, layer.in_features)
    torch.manual_seed(0)
    change = layer.delta(features)
    assert change.abs().max() <= 1e-5 * features.abs().max()
    randomise(network)
    torch.manual_seed(0)
    first = layer.delta(features)
    torch.manual_seed(1)
    second = layer.delta(features)
    assert not torch.allclose(first, second)  # dropout is active in training


def test_trilora_orthogonality_penalty_gradient_matches_autograd():
    layout, network = build("sd1", algo="trilora", ortho_reg="0.3")
    network.apply_to(layout.text_encoders, layout.unet)
    randomise(network)
    params = list(network.parameters())
    # autograd of the documented penalty γ(‖PᵀP − I‖² + ‖QQᵀ − I‖²)
    penalty = network.orthogonality_penalty()
    expected = torch.autograd.grad(penalty, params, allow_unused=True)
    optimizer = torch.optim.SGD(network.prepare_optimizer_params(None, 1.0, 1.0)[0], lr=1.0)
    before = [p.detach().clone() for p in params]
    optimizer.zero_grad()
    optimizer.step()  # no loss gradient at all: the step pre-hook adds only the penalty's
    checked = 0
    for p, b, g in zip(params, before, expected):
        if g is None:
            torch.testing.assert_close(p.detach(), b)  # λ: untouched by the penalty
            continue
        torch.testing.assert_close(b - p.detach(), g, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == 2 * len(network.loras)
    network.remove()
    # after remove() the hook is gone: another optimizer step changes nothing
    optimizer.zero_grad(set_to_none=True)
    snapshot = [p.detach().clone() for p in params]
    optimizer.step()
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, snapshot))


def test_attention_targets_only_adapt_attention_projections():
    layout, network = build("sdxl", targets="attention")
    names = [l.lora_name for l in network.unet_loras]
    assert names and all(n.rsplit("_attn", 1)[1][2:] in ("to_q", "to_k", "to_v", "to_out_0") for n in names)
    _, everything = build("sdxl")
    assert len(everything.unet_loras) > len(network.unet_loras)
    assert any(l.lora_name.endswith("proj_in") for l in everything.unet_loras)
    sd1_layout, sd1_network = build("sd1")
    proj_in = next(l for l in sd1_network.unet_loras if l.lora_name.endswith("proj_in"))
    assert proj_in.is_conv and proj_in.factor("down").shape[2:] == (1, 1)  # SD1's 1x1 conv keeps 4-D factors


def test_readme_network_args_table_is_the_declared_options():
    """README's --network_args table is generated from networks/tlora_options.py."""
    import os

    from networks.tlora_options import options_markdown

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"), encoding="utf-8").read()
    begin, end = "<!-- network_args table: python -m networks.tlora_options -->\n", "\n<!-- end of network_args table -->"
    assert readme.split(begin, 1)[1].split(end, 1)[0] == options_markdown()
