#!/usr/bin/env python
"""Real sd-scripts FLUX.1 training with networks.tlora, verified: runs
``bench/sd_scripts_flux_harness.py`` (sd-scripts' own ``flux_train_network.py``, random-weight
models of the real classes) in this process, and adds observation-only checks:

* masks: every call of two masked adapters (``double_blocks.0.img_attn.qkv`` and
  ``single_blocks.0.linear1``, or their split_qkv parts) records how many ranks each sample kept;
  a DiT forward pre-hook records the sigmas sd-scripts passed (training and sampling calls). Each
  recorded count is compared with r(t) = floor(((T - t)/T)^p (R - r_min)) + r_min, t = sigma·T,
  written out here (recomputations inside backward use the sigmas of the forward being
  differentiated);
* layers: the network's DiT layer names vs sd-scripts' own ``networks.lora_flux`` built on the
  same models with the same settings (``create_network`` + ``apply_to`` with the same flags);
* round trip: the saved file, rebuilt with ``create_network_from_weights`` on the same model,
  gives identical DiT outputs to the trained network at several sigmas (incl. sigma = 1.0);
* conversion: ``tlora-convert to-kohya`` of the saved file; its key set equals lora_flux's
  state_dict keys for the same settings (algo=lora: same shapes too).

Usage (sd-scripts venv):
    python bench/sd_scripts_flux_check.py --network-module networks.tlora --steps 3 \
        --network-args algo=tlora min_rank=1 [any harness option]

Prints ``FLUX_CHECK {json}`` and exits 1 if a check fails.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import sd_scripts_flux_harness as H  # noqa: E402

while HERE in sys.path:  # (the harness already takes bench/ off sys.path)
    sys.path.remove(HERE)

SPY_LAYERS = ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1",
              "lora_transformer_transformer_blocks_0_attn_to_q", "lora_transformer_single_transformer_blocks_0_attn_to_k")


def formula_count(sigma: float, rank: int, min_rank: int, power: float = 1.0, T: int = 1000) -> int:
    t = sigma * T
    return math.floor(((T - t) / T) ** power * (rank - min_rank)) + min_rank


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    h = H.parse_harness_args(argv)
    sd_scripts, project_root = H.base.setup_paths(h.sd_scripts, h.project_root)
    import torch

    import networks.tlora as tlora
    from networks.tlora_layer import FactorisedAdapter
    from networks.tlora_network import TLoRANetwork

    captured = {"dit_sigmas": [], "mask_calls": [], "flux": None, "network": None, "apply_to": None, "create": None}

    # -- observation: the DiT's sigmas, the masks two layers use, the network and its arguments
    orig_probes = H.install_model_probes

    def install_model_probes(flux, record):
        orig_probes(flux, record)
        captured["flux"] = flux

        def sigma_probe(module, args, kwargs):
            ts = kwargs.get("timesteps")
            if ts is not None:
                captured["dit_sigmas"].append({"values": [float(v) for v in ts.detach().reshape(-1).to(torch.float64)],
                                               "dtype": str(ts.dtype), "grad": torch.is_grad_enabled()})

        flux.register_forward_pre_hook(sigma_probe, with_kwargs=True)

    H.install_model_probes = install_model_probes

    orig_rank_weights = FactorisedAdapter.rank_weights

    def rank_weights(self, batch_size, device, dtype):
        mask = orig_rank_weights(self, batch_size, device, dtype)
        if self.lora_name in SPY_LAYERS and self.timestep_state is not None:
            captured["mask_calls"].append({
                "layer": self.lora_name, "call": len(captured["dit_sigmas"]) - 1,
                "in_backward": H._in_backward(), "rank": self.rank, "min_rank": self.min_rank,
                "counts": None if mask is None else [int(v) for v in (mask != 0).sum(dim=1)],
            })
        return mask

    FactorisedAdapter.rank_weights = rank_weights

    orig_apply = TLoRANetwork.apply_to

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder=True, apply_unet=True):
        if captured["network"] is None:
            captured["network"] = self
            captured["apply_to"] = (text_encoder, unet, apply_text_encoder, apply_unet)
        return orig_apply(self, text_encoder, unet, apply_text_encoder, apply_unet)

    TLoRANetwork.apply_to = apply_to

    orig_create = tlora.create_network

    def create_network(*a, **k):
        captured["create"] = (a, dict(k))
        return orig_create(*a, **k)

    tlora.create_network = create_network

    if not h.workdir:
        argv += ["--workdir", tempfile.mkdtemp(prefix="sdh_fluxcheck_")]
        h = H.parse_harness_args(argv)
    rc = H.main(argv)
    with open(os.path.join(h.workdir, "result.json")) as f:
        result = json.load(f)
    check = {"harness_status": result.get("status"), "errors": []}
    if rc != 0 or captured["network"] is None:
        check["errors"].append(f"training failed: {result.get('error', '')[-400:]}")
        print("FLUX_CHECK " + json.dumps(check), flush=True)
        return 1
    net, flux = captured["network"], captured["flux"]
    te, _, apply_te, apply_unet = captured["apply_to"]
    config = net.config
    check["algo"] = config.algo
    check["dit_layers"] = len(net.unet_loras)
    check["te_layers"] = len(net.text_encoder_loras)
    check["te3_layers"] = sum(1 for layer in net.text_encoder_loras if layer.lora_name.startswith("lora_te3_"))

    # -- masks vs the formula
    if config.spec.masked:
        bad, checked, by_kind = [], 0, {"train": 0, "backward": 0, "sampling": 0}
        for call in captured["mask_calls"]:
            sigmas = captured["dit_sigmas"][call["call"]]["values"]
            counts = call["counts"]
            want = [formula_count(s, call["rank"], call["min_rank"], config.rank_schedule_power, config.num_train_timesteps)
                    for s in sigmas]
            if counts is None or len(counts) % len(want) or counts != want * (len(counts) // len(want)):
                bad.append({"layer": call["layer"], "sigmas": sigmas, "counts": counts, "want": want})
            checked += 1
            kind = "backward" if call["in_backward"] else ("train" if captured["dit_sigmas"][call["call"]]["grad"] else "sampling")
            by_kind[kind] += 1
        check["mask_calls_checked"] = checked
        check["mask_calls_by_kind"] = by_kind
        check["mask_examples"] = [
            {"sigmas": [round(s, 6) for s in captured["dit_sigmas"][c["call"]]["values"]], "active": c["counts"], "layer": c["layer"],
             "in_backward": c["in_backward"]} for c in captured["mask_calls"][:: max(1, len(captured["mask_calls"]) // 6)][:6]]
        check["sigma_dtypes"] = sorted({c["dtype"] for c in captured["dit_sigmas"]})
        if bad or not checked:
            check["errors"].append(f"masks differ from r(sigma*T) in {len(bad)} of {checked} calls: {bad[:2]}")

    # -- lora_flux on the same models with the same settings
    import importlib

    lora_flux = importlib.import_module("networks.lora_flux")
    a, k = captured["create"]
    lf_args = {key: v for key, v in k.items() if key in ("train_blocks", "train_double_block_indices", "train_single_block_indices",
                                                         "train_t5xxl", "dropout")}
    lf_net = lora_flux.create_network(*a, **lf_args)
    models = [m for m in [flux] + list(te or []) if m is not None]
    saved_forwards = [(mod, mod.__dict__.get("forward")) for m in models for mod in m.modules()]
    lf_net.apply_to(te, flux, apply_te, apply_unet)
    lf_keys = {key: tuple(v.shape) for key, v in lf_net.state_dict().items()}
    lf_dit = sorted(layer.lora_name for layer in lf_net.unet_loras)
    lf_te = sorted(layer.lora_name for layer in lf_net.text_encoder_loras)
    for mod, forward in saved_forwards:  # lora_flux replaced forwards: put back what was there (our adapters')
        if forward is None:
            mod.__dict__.pop("forward", None)
        else:
            mod.forward = forward
    ours_dit = sorted(layer.lora_name for layer in net.unet_loras)
    check["lora_flux_dit_layers"] = len(lf_dit)
    if config.split_qkv:
        paths = {id(m): "lora_unet_" + path.replace(".", "_") for path, m in flux.named_modules()}
        covered = sorted({paths[id(layer.org_module)] for layer in net.unet_loras})
        check["split_parts"] = len(ours_dit)
        if covered != lf_dit:
            check["errors"].append("split_qkv adapts other modules than lora_flux")
    elif ours_dit != lf_dit:
        check["errors"].append(f"DiT layer names differ from lora_flux: only ours {sorted(set(ours_dit) - set(lf_dit))[:4]}, "
                               f"only lora_flux {sorted(set(lf_dit) - set(ours_dit))[:4]}")
    if sorted(layer.lora_name for layer in net.text_encoder_loras) != lf_te:
        check["errors"].append("text encoder layer names differ from lora_flux")

    # -- the saved file: identical outputs when rebuilt
    saved = os.path.join(h.workdir, "out", h.output_name + ".safetensors")
    p = flux.params
    g = torch.Generator().manual_seed(5)
    b, n_img, n_txt = 3, 16, 8
    sigmas = torch.tensor([1.0, 0.62, 0.05])
    fp8 = next(flux.parameters()).dtype == torch.float8_e4m3fn
    dtype = torch.bfloat16 if h.mixed_precision == "bf16" else torch.float32
    inputs = dict(img=torch.randn(b, n_img, p.in_channels, generator=g), img_ids=torch.zeros(b, n_img, 3),
                  txt=torch.randn(b, n_txt, p.context_in_dim, generator=g), txt_ids=torch.zeros(b, n_txt, 3),
                  y=torch.randn(b, p.vec_in_dim, generator=g), timesteps=sigmas.to(dtype),
                  guidance=torch.full((b,), 3.5), txt_attention_mask=None)
    flux.eval()

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=h.mixed_precision == "bf16"):
            if hasattr(flux, "prepare_block_swap_before_forward"):
                flux.prepare_block_swap_before_forward()
            return flux(**inputs).float()

    net.eval()
    out_trained = run()
    net.remove()
    out_base = run()
    net2, _ = tlora.create_network_from_weights(1.0, saved, None, te, flux, for_inference=True)
    net2.apply_to(te, flux, apply_te, apply_unet)
    net2.eval()
    out_loaded = run()
    net2.remove()
    check["roundtrip_max_abs_diff"] = float((out_trained - out_loaded).abs().max())
    check["roundtrip_change_vs_base"] = float((out_trained - out_base).abs().max())
    check["fp8_base_weights"] = fp8
    if not torch.equal(out_trained, out_loaded):
        check["errors"].append(f"reloaded file gives other outputs (max diff {check['roundtrip_max_abs_diff']:.3e})")
    if config.spec.masked:
        check["loaded_min_rank"] = sorted({layer.min_rank for layer in net2.unet_loras})
        if check["loaded_min_rank"] != [config.min_rank]:
            check["errors"].append(f"reloaded min_rank {check['loaded_min_rank']} != {config.min_rank}")

    # -- to-kohya: key set as lora_flux writes it
    from converters.convert import convert_file

    kohya = os.path.join(h.workdir, "out", "kohya.safetensors")
    report = convert_file(saved, kohya, target="kohya", mask="mean" if config.spec.masked else "full")
    from safetensors import safe_open

    with safe_open(kohya, framework="pt") as f:
        kohya_keys = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        kohya_meta = f.metadata()
    check["kohya_tensors"] = len(kohya_keys)
    check["lora_flux_tensors"] = len(lf_keys)
    check["kohya_max_rel_error"] = report.max_rel_error
    check["kohya_arch"] = kohya_meta.get("modelspec.architecture")
    if set(kohya_keys) != set(lf_keys):
        check["errors"].append(f"to-kohya keys differ from lora_flux's: only ours {sorted(set(kohya_keys) - set(lf_keys))[:4]}, "
                               f"only lora_flux {sorted(set(lf_keys) - set(kohya_keys))[:4]}")
    if config.algo == "lora" and not config.split_qkv and kohya_keys != lf_keys:
        diff = [key for key in kohya_keys if kohya_keys[key] != lf_keys.get(key)]
        check["errors"].append(f"algo=lora: shapes differ from lora_flux's, e.g. {diff[:3]}")
    check["sample_images"] = result.get("sample_images")
    check["step_seconds"] = result.get("step_seconds")
    check["ok"] = not check["errors"]
    print("FLUX_CHECK " + json.dumps(check, default=str), flush=True)
    with open(os.path.join(h.workdir, "check.json"), "w") as f:
        json.dump(check, f, default=str)
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
