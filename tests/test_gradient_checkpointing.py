"""Gradient checkpointing recomputes the adapted layers during backward; the mask they see then
must be the one of the forward being differentiated, even after another no-grad U-Net call."""

import pytest
import torch

import networks.tlora as tlora
from netutil import inputs, make_layout, randomise

T_TRAIN = torch.tensor([900, 100])
T_OTHER = torch.tensor([999, 999])


def gradients(layout_name, checkpointing, interleave, t_train=T_TRAIN, reentrant=True):
    layout = make_layout(layout_name)
    network = tlora.create_network(1.0, 8, 8, None, layout.text_encoder_arg(), layout.unet, algo="tlora", min_rank="1")
    randomise(network)  # a trained state, so every rank matters
    network.apply_to(layout.text_encoder_arg(), layout.unet, False, True)
    layout.unet.train()
    if checkpointing:
        if layout_name == "sgm":
            layout.unet.set_gradient_checkpointing(True, reentrant=reentrant)
        else:
            layout.unet.enable_gradient_checkpointing()
    x, ids = inputs()
    x.requires_grad_(True)  # sd-scripts does this when checkpointing
    with torch.no_grad():
        context = layout.encode(ids)
    loss = layout.call(x, t_train, context).pow(2).mean()
    if interleave:  # e.g. sd-scripts' differential output preservation: a no-grad U-Net call before backward
        with torch.no_grad():
            layout.call(x.detach(), T_OTHER, context)
    loss.backward()
    assert network.timestep_state.timesteps is None  # cleared when backward finished
    return {k: p.grad.clone() for k, p in network.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout_name,reentrant", [("sd1", None), ("sgm", True), ("sgm", False)])
def test_checkpointed_gradients_equal_plain_gradients(layout_name, reentrant):
    reference = gradients(layout_name, checkpointing=False, interleave=False)
    checkpointed = gradients(layout_name, checkpointing=True, interleave=True, reentrant=reentrant is not False)
    assert reference.keys() == checkpointed.keys() and len(reference) > 10
    for key in reference:
        torch.testing.assert_close(checkpointed[key], reference[key], rtol=1e-4, atol=1e-7, msg=key)
    # the interleaved call's timesteps would give other gradients: the comparison has teeth
    wrong = gradients(layout_name, checkpointing=False, interleave=False, t_train=T_OTHER)
    assert any(not torch.allclose(wrong[k], reference[k], rtol=1e-3, atol=1e-6) for k in reference)
