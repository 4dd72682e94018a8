"""Initialisation: zero change at step 0, orthonormal Ortho factors, the λ spectrum of a Gaussian."""

import math

import pytest
import torch

import networks.tlora as tlora
from networks.tlora_layer import OrthoSampler, gaussian_singular_values, ortho_factors_random, singular_slice
from netutil import ALGOS, inputs, make_layout, network_args


@pytest.mark.parametrize("layout_name", ["sd1", "sgm"])
@pytest.mark.parametrize("algo", ALGOS)
def test_change_is_exactly_zero_at_step_0(layout_name, algo):
    layout = make_layout(layout_name)
    x, ids = inputs()
    t = torch.tensor([999, 10])
    with torch.no_grad():
        ctx = layout.encode(ids)
        before = layout.call(x, t, ctx)
    net = tlora.create_network(1.0, 8, 4, None, layout.text_encoder_arg(), layout.unet, **network_args(algo, conv_dim="4"))
    net.apply_to(layout.text_encoder_arg(), layout.unet)
    with torch.no_grad():
        for layer in net.loras:
            assert torch.count_nonzero(layer.delta_weight()) == 0, layer.lora_name
        after = layout.call(x, t, layout.encode(ids))
    # the weight-space change is exactly zero; the forward adds (P·c·Q − P0·c0·Q0)x computed as two
    # branches, which BLAS may round differently by an ulp, so compare outputs at float precision
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_ortho_factors_are_orthonormal_and_base_is_a_copy():
    layout = make_layout("sd1")
    net = tlora.create_network(1.0, 8, 8, None, layout.text_encoder_arg(), layout.unet, algo="tlora", conv_dim="4")
    assert net.loras
    for layer in net.loras:
        q = layer.factor("down").reshape(layer.rank, -1)
        p = layer.factor("up").reshape(-1, layer.rank)
        eye = torch.eye(layer.rank)
        assert torch.allclose(q @ q.T, eye, atol=1e-5), layer.lora_name
        assert torch.allclose(p.T @ p, eye, atol=1e-5), layer.lora_name
        assert torch.equal(layer.factor("down"), layer.factor("down_base"))
        assert torch.equal(layer.factor("up"), layer.factor("up_base"))
        assert torch.equal(layer.factor("lambda"), layer.factor("lambda_base"))
        assert not layer.factor("down_base").requires_grad and not layer.factor("lambda_base").requires_grad
        lam = layer.factor("lambda")
        assert torch.all(lam[:-1] >= lam[1:])


@pytest.mark.parametrize("init", ["last", "principal", "middle"])
def test_init_takes_the_named_singular_triplets_of_the_weight(init):
    """init=last takes the R smallest singular values (and their vectors), principal the R largest,
    middle the R around the middle: checked against torch.linalg.svd of each layer's weight."""
    layout = make_layout("sd1")
    rank = 4
    net = tlora.create_network(1.0, rank, rank, None, layout.text_encoder_arg(), layout.unet, algo="ortho", init=init, init_source="weight")
    checked = 0
    for layer in net.unet_loras:
        weight = layer.org_module.weight.detach().double().reshape(layer.out_features, -1)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        n = s.numel()
        start = {"last": n - rank, "principal": 0, "middle": (n - rank) // 2}[init]
        lam = layer.factor("lambda").double()
        assert torch.allclose(lam, s[start:start + rank], rtol=1e-4, atol=1e-6), (layer.lora_name, lam, s)
        # the factors are the matching singular vectors (up to a common sign per triplet)
        p = layer.factor("up").double().reshape(-1, rank)
        q = layer.factor("down").double().reshape(rank, -1)
        signs = torch.sign((p * u[:, start:start + rank]).sum(0))
        # well separated values: the vectors are unique and float32 SVD finds them to ~1e-3
        window = s[max(start - 1, 0):start + rank + 1]
        if bool((window.diff().abs() > 1e-2 * s[0]).all()):
            assert torch.allclose(p * signs, u[:, start:start + rank], atol=2e-3), layer.lora_name
            assert torch.allclose(q * signs[:, None], vh[start:start + rank], atol=2e-3), layer.lora_name
            checked += 1
    assert checked >= 5
    if init == "last":  # and they are the smallest: every other singular value is at least as large
        layer = net.unet_loras[0]
        s = torch.linalg.svdvals(layer.org_module.weight.detach().double().reshape(layer.out_features, -1))
        assert float(layer.factor("lambda").max()) <= float(s[: s.numel() - rank].min()) + 1e-6


def _ks_statistic(a, b):
    a, b = torch.sort(a).values, torch.sort(b).values
    values = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, values, right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, values, right=True).double() / b.numel()
    return (cdf_a - cdf_b).abs().max().item()


@pytest.mark.parametrize("rows,cols,rank", [(12, 20, 4), (16, 16, 3), (24, 10, 5)])
def test_lambda_spectrum_matches_svd_of_gaussian(rows, cols, rank):
    """Two-sample Kolmogorov–Smirnov test per selected singular value, against torch.linalg.svd
    of real Gaussian matrices with std 1/R (the official init). alpha = 1e-4 per comparison."""
    torch.manual_seed(1234)
    draws = 1500
    std = 1.0 / rank
    reference = torch.stack([torch.linalg.svdvals(torch.randn(rows, cols) * std) for _ in range(draws)])
    ours = torch.stack([gaussian_singular_values(rows, cols, std) for _ in range(draws)])
    n = min(rows, cols)
    critical = math.sqrt(-math.log(1e-4 / 2) / 2) * math.sqrt(2 / draws)
    for init in ("last", "principal", "middle"):
        sel = singular_slice(n, rank, init)
        for index in range(sel.start, sel.stop):
            statistic = _ks_statistic(ours[:, index], reference[:, index])
            assert statistic < critical, (init, index, statistic, critical)
    # and the test has teeth: a wrong scale is rejected
    assert _ks_statistic(ours[:, 0] * 1.1, reference[:, 0]) > critical


def test_ortho_factor_shapes_and_selection():
    sampler = OrthoSampler()
    p, lam, q = ortho_factors_random(20, 12, 4, "last", sampler)
    assert p.shape == (12, 4) and q.shape == (4, 20) and lam.shape == (4,)
    spectrum = sampler.spectrum(12, 20) / 4  # (12, 20) and (20, 12) share one draw; std 1/R
    assert torch.equal(lam, spectrum[-4:])
    _, lam_principal, _ = ortho_factors_random(20, 12, 4, "principal", sampler)
    assert torch.equal(lam_principal, spectrum[:4])
    # batched frames are orthonormal, independent draws with their own storage
    sampler.prepare([(20, 12, 4), (20, 12, 4)])
    a, b = sampler.frame(20, 4), sampler.frame(20, 4)
    assert torch.allclose(a.T @ a, torch.eye(4), atol=1e-5) and not torch.allclose(a, b)
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


def test_init_source_weight_takes_svd_of_the_pretrained_weight():
    layout = make_layout("sd1")
    net = tlora.create_network(1.0, 4, 4, None, layout.text_encoder_arg(), layout.unet, algo="ortho", init="principal", init_source="weight")
    for layer in net.unet_loras[:5]:
        weight = layer.org_module.weight.detach().reshape(layer.out_features, -1)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        assert torch.allclose(layer.factor("lambda"), s[:4], atol=1e-5)
        rebuilt = layer.factor("up").reshape(-1, 4) @ torch.diag(layer.factor("lambda")) @ layer.factor("down").reshape(4, -1)
        assert torch.allclose(rebuilt, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)


def test_trilora_starts_with_zero_lambda_and_lora_with_zero_up():
    layout = make_layout("sd1")
    tri = tlora.create_network(1.0, 4, 4, None, layout.text_encoder_arg(), layout.unet, algo="trilora")
    for layer in tri.loras:
        assert torch.count_nonzero(layer.factor("lambda")) == 0
        assert torch.count_nonzero(layer.factor("up")) > 0 and torch.count_nonzero(layer.factor("down")) > 0
    plain = tlora.create_network(1.0, 4, 4, None, layout.text_encoder_arg(), layout.unet, algo="lora")
    for layer in plain.loras:
        assert torch.count_nonzero(layer.factor("up")) == 0
        bound = 1.0 / math.sqrt(layer.factor("down")[0].numel())  # kaiming_uniform(a=sqrt 5) as sd-scripts
        assert layer.factor("down").abs().max() <= bound + 1e-6


@pytest.mark.parametrize("algo", ["tlora", "trilora", "lora"])
def test_creation_is_reproducible_under_a_seed(algo):
    """sd-scripts seeds before create_network; resumed runs rebuild the network: the same seed
    must give the same factors and leave the global RNG in the same state."""
    layout = make_layout("sgm")
    states = []
    for _ in range(2):
        torch.manual_seed(7)
        net = tlora.create_network(1.0, 8, 8, None, layout.text_encoders, layout.unet, algo=algo, conv_dim="4")
        states.append(({k: v.clone() for k, v in net.state_dict().items()}, torch.rand(3)))
    (first, after_first), (second, after_second) = states
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(after_first, after_second)
