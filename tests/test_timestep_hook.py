"""The U-Net forward pre-hook: timesteps in every form the hosts pass them, per-sample masks,
classifier-free-guidance broadcasting, and all ranks when there is no timestep."""

import pytest
import torch

import networks.tlora as tlora
from networks.tlora_families import FLUX_BFL, FLUX_DIFFUSERS, SD_UNET, SDXL_SGM
from netutil import inputs, make_layout


def formula_mask(t, rank, min_rank):
    import math

    count = math.floor(((1000 - t) / 1000) * (rank - min_rank)) + min_rank
    return [1.0] * count + [0.0] * (rank - count)


def spy(layer, seen):
    original = layer.rank_weights

    def recording(batch_size, device, dtype):
        mask = original(batch_size, device, dtype)
        seen.append(None if mask is None else mask.clone())
        return mask

    layer.rank_weights = recording


@pytest.fixture()
def sd1_network():
    layout = make_layout("sd1")
    network = tlora.create_network(1.0, 8, 8, None, layout.text_encoder_arg(), layout.unet, algo="tlora", min_rank="2")
    network.apply_to(layout.text_encoder_arg(), layout.unet)
    return layout, network


def test_timestep_argument_every_form_of_every_layout():
    """Where each host passes the timestep (REFERENCE §3/3b) and the schedule's t it maps to."""
    x = torch.zeros(2)
    sd = SD_UNET.timestep  # diffusers / sd-scripts SD1: forward(sample, timestep, ...)
    assert sd.read((x, torch.tensor([5, 7])), {}).tolist() == [5, 7]
    assert sd.read((x, torch.tensor(5)), {}).tolist() == [5]
    assert sd.read((x, 5), {}).tolist() == [5.0]
    assert sd.read((x, 999.5), {}).tolist() == [999.5]
    assert sd.read((x,), {"timestep": torch.tensor([3])}).tolist() == [3]
    assert sd.read((x,), {}) is None
    assert sd.schedule_t(torch.tensor([5.0]), 1000).tolist() == [5.0]
    sgm = SDXL_SGM.timestep  # sd-scripts SDXL: forward(x, timesteps=None, context=None, y=None)
    assert sgm.read((x,), {"timesteps": torch.tensor([4, 4])}).tolist() == [4, 4]
    assert sgm.read((x, torch.tensor([9])), {}).tolist() == [9]
    # sd-scripts FLUX: keywords only, timesteps = sigma in [0, 1]; t = sigma * T
    bfl = FLUX_BFL.timestep
    sigma = torch.tensor([1.0, 0.25], dtype=torch.bfloat16)
    assert bfl.read((), {"img": x, "timesteps": sigma, "guidance": torch.tensor([3.5])}).tolist() == [1.0, 0.25]
    assert bfl.schedule_t(bfl.read((), {"timesteps": sigma}), 1000).tolist() == [1000.0, 250.0]
    assert bfl.read((x, x, x, x, torch.tensor([0.5])), {}).tolist() == [0.5]  # positional, forward(img, img_ids, txt, txt_ids, timesteps, ...)
    assert bfl.read((), {"guidance": torch.tensor([3.5])}) is None  # guidance is not a timestep
    # diffusers FluxTransformer2DModel: forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)
    flux = FLUX_DIFFUSERS.timestep
    assert flux.read((), {"hidden_states": x, "timestep": torch.tensor([0.75])}).tolist() == [0.75]
    assert flux.schedule_t(torch.tensor([0.75], dtype=torch.float64), 500).tolist() == [375.0]


def test_per_sample_masks_follow_each_timestep(sd1_network):
    layout, network = sd1_network
    layer = network.unet_loras[0]
    seen = []
    spy(layer, seen)
    x, ids = inputs(batch=3)
    t = torch.tensor([999, 500, 0])
    with torch.no_grad():
        layout.call(x, t, layout.encode(ids))
    mask = seen[0]
    assert mask.shape == (3, 8)
    assert [row for row in mask.tolist()] == [formula_mask(int(v), 8, 2) for v in t]
    assert not torch.equal(mask[0], mask[2])


def test_scalar_timestep_and_classifier_free_guidance_broadcast(sd1_network):
    layout, network = sd1_network
    layer = next(l for l in network.unet_loras if not l.is_conv)
    seen = []
    spy(layer, seen)
    x, ids = inputs(batch=4)
    with torch.no_grad():
        context = layout.encode(ids)
        layout.unet(x, 250, context)  # a Python number, as sampling passes it
        # a host that stacks [uncond; cond] (batch 4) but passes the 2 timesteps of one half
        network.timestep_state.set(torch.tensor([900, 100]))
        layer(torch.randn(4, 5, layer.in_features))
        network.timestep_state.set(None)
    assert seen[0].tolist() == [formula_mask(250, 8, 2)]
    assert seen[1].tolist() == [formula_mask(900, 8, 2), formula_mask(100, 8, 2)] * 2


def test_batch_not_multiple_of_timesteps_is_a_clear_error(sd1_network):
    layout, network = sd1_network
    x, ids = inputs(batch=3)
    with pytest.raises(ValueError, match="not a multiple"):
        with torch.no_grad():
            network.timestep_state.set(torch.tensor([1, 2]))
            layer = next(l for l in network.unet_loras if not l.is_conv)
            layer(torch.randn(3, 64, layer.in_features))


def test_no_timestep_means_all_ranks(sd1_network):
    layout, network = sd1_network
    layer = network.unet_loras[1]
    seen = []
    spy(layer, seen)
    features = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        layer(features)  # a bare call before any U-Net forward
        x, ids = inputs()
        layout.call(x, torch.tensor([999, 999]), layout.encode(ids))
        layer(features)  # after the U-Net forward the timesteps are cleared again
    assert seen[0] is None and seen[1] is not None and seen[2] is None
    assert network.timestep_state.timesteps is None
    for te_layer in network.text_encoder_loras:
        assert te_layer.timestep_state is None  # text encoders see no timestep and are never masked


def test_generation_script_wrapper_without_module_base(tmp_path):
    """sd-scripts' gen_img wraps the U-Net in a non-Module object with `.delegate`: the hook goes
    on the delegate and fires at every denoising step."""
    layout = make_layout("sd1")
    network = tlora.create_network(1.0, 8, 8, None, layout.text_encoder_arg(), layout.unet, algo="tlora", min_rank="2")
    network.save_weights(str(tmp_path / "n.safetensors"), None, {})

    class Wrapper:
        def __init__(self, delegate):
            self.delegate = delegate

        def __getattr__(self, name):
            return getattr(self.delegate, name)

        def __call__(self, *args, **kwargs):
            return self.delegate(*args, **kwargs)

    fresh = make_layout("sd1")
    wrapper = Wrapper(fresh.unet)
    loaded, weights = tlora.create_network_from_weights(1.0, str(tmp_path / "n.safetensors"), None, fresh.text_encoders, wrapper, for_inference=True)
    loaded.apply_to(fresh.text_encoders, wrapper)  # two arguments, as gen_img.py calls it
    info = loaded.load_state_dict(weights, False)
    assert not info.unexpected_keys and not info.missing_keys
    seen = []
    spy(loaded.unet_loras[0], seen)
    x, ids = inputs()
    with torch.no_grad():
        context = fresh.encode(ids)
        for t in (999, 500, 1):
            wrapper(x, t, context)
    assert [m.tolist() for m in seen] == [[formula_mask(t, 8, 2)] for t in (999, 500, 1)]


def test_fixed_mask_modes_override_the_timestep(tmp_path):
    import math

    layout = make_layout("sd1")
    network = tlora.create_network(1.0, 8, 8, None, layout.text_encoder_arg(), layout.unet, algo="tlora", min_rank="2")
    network.save_weights(str(tmp_path / "n.safetensors"), None, {})
    fresh = make_layout("sd1")
    loaded, _ = tlora.create_network_from_weights(1.0, str(tmp_path / "n.safetensors"), None, fresh.text_encoders, fresh.unet, mask="mean")
    loaded.apply_to(fresh.text_encoders, fresh.unet)
    layer = next(l for l in loaded.unet_loras if not l.is_conv)
    seen = []
    spy(layer, seen)
    x, ids = inputs()
    with torch.no_grad():
        context = fresh.encode(ids)
        fresh.call(x, torch.tensor([999, 0]), context)
        loaded.set_fixed_mask("t=250")
        fresh.call(x, torch.tensor([999, 0]), context)
        loaded.set_fixed_mask("full")
        fresh.call(x, torch.tensor([999, 0]), context)
        loaded.set_fixed_mask(None)
        fresh.call(x, torch.tensor([999, 0]), context)
    mean = [sum(1 for t in range(1000) if math.floor((1000 - t) / 1000 * 6) + 2 > i) / 1000 for i in range(8)]
    assert seen[0].shape == (1, 8) and seen[0][0].tolist() == pytest.approx(mean)
    assert seen[1].tolist() == [formula_mask(250, 8, 2)]
    assert seen[2] is None
    assert seen[3].tolist() == [formula_mask(999, 8, 2), formula_mask(0, 8, 2)]
    with pytest.raises(ValueError, match="mask='sometimes' is unknown"):
        loaded.set_fixed_mask("sometimes")


@pytest.mark.parametrize("algo", ["tlora", "tlora_vanilla"])
def test_batch_of_different_timesteps_equals_each_sample_alone(algo):
    """A batch whose samples have different timesteps gives, row by row, the output (and the
    gradient) of each sample run alone at its own timestep, with trained factors, Linear layers
    (attention, ff) and 1x1 / 3x3 convolutions (proj_in/out, ResNet convs with conv_dim)."""
    from netutil import randomise

    layout = make_layout("sd1")
    network = tlora.create_network(1.0, 8, 8, None, layout.text_encoder_arg(), layout.unet, algo=algo, min_rank="1", conv_dim="4")
    randomise(network, seed=11)
    network.apply_to(layout.text_encoder_arg(), layout.unet, False, True)
    assert any(layer.is_conv and layer.kernel_size == (3, 3) for layer in network.unet_loras)
    assert any(layer.is_conv and layer.kernel_size == (1, 1) for layer in network.unet_loras)
    assert any(not layer.is_conv for layer in network.unet_loras)
    x, ids = inputs(batch=3, seed=4)
    timesteps = torch.tensor([999, 500, 3])
    with torch.no_grad():
        context = layout.encode(ids)
    params = [p for p in network.parameters() if p.requires_grad]

    batch_out = layout.call(x, timesteps, context)
    target = torch.randn_like(batch_out)
    per_row_loss = (batch_out - target).pow(2).flatten(1).sum(1)
    batch_grads = torch.autograd.grad(per_row_loss.sum(), params)
    single_grads = [torch.zeros_like(p) for p in params]
    for row in range(3):
        alone = layout.call(x[row:row + 1], timesteps[row:row + 1], context[row:row + 1])
        torch.testing.assert_close(batch_out[row:row + 1].detach(), alone.detach(), rtol=1e-4, atol=1e-5)
        loss = (alone - target[row:row + 1]).pow(2).sum()
        for acc, g in zip(single_grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                acc += g
    for p, got, want in zip(params, batch_grads, single_grads):  # float32 sums in another order: relative norm
        assert float((got - want).norm()) <= 1e-4 * float(want.norm()) + 1e-7, (p.shape, float((got - want).norm()), float(want.norm()))
    # one shared mask would give other outputs: at t=999 only min_rank ranks are active
    shared = layout.call(x, torch.tensor([3, 3, 3]), context).detach()
    assert not torch.allclose(shared[0], batch_out[0].detach(), atol=1e-4)
