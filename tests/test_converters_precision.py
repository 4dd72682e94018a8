"""Early in training the Ortho forms' change P·c·Q − P0·c0·Q0 is a small difference of two large
products. The exact kohya file must still carry that small change accurately in fp32 and fp16."""

import pytest
import torch
from safetensors.torch import load_file

import networks.tlora as tlora
from converters import convert_file
from netutil import make_layout


@pytest.mark.parametrize("dtype,tolerance", [("fp32", 1e-5), ("fp16", 5e-3)])
def test_barely_trained_ortho_file_converts_accurately(tmp_path, dtype, tolerance):
    layout = make_layout("sd1")
    network = tlora.create_network(1.0, 8, 8, None, layout.text_encoder_arg(), layout.unet, algo="tlora", min_rank="4")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():  # one tiny optimiser step's worth of change
            p.add_(torch.randn(p.shape, generator=g) * 1e-5)
    native = tmp_path / "native.safetensors"
    network.save_weights(str(native), None, {})
    out = tmp_path / "kohya.safetensors"
    convert_file(str(native), str(out), target="kohya", mask="full", dtype=dtype)

    source, converted = load_file(str(native)), load_file(str(out))
    worst = 0.0
    for layer in network.loras:
        n = layer.lora_name
        f = lambda key: source[f"{n}.{key}"].double()
        P, Q, lam = f("svd_up.weight").flatten(1), f("svd_down.weight").flatten(1), f("svd_lambda")
        P0, Q0, lam0 = f("svd_up_base.weight").flatten(1), f("svd_down_base.weight").flatten(1), f("svd_lambda_base")
        expected = (P * lam) @ Q - (P0 * lam0) @ Q0  # scale alpha/R = 1 here
        up, down = converted[f"{n}.lora_up.weight"].float(), converted[f"{n}.lora_down.weight"].float()
        got = (up.flatten(1) @ down.flatten(1)).double() * converted[f"{n}.alpha"].item() / down.shape[0]
        worst = max(worst, ((got - expected).norm() / expected.norm()).item())
    print(f"worst relative error of the change ({dtype}): {worst:.2e}")
    assert worst < tolerance
