#!/usr/bin/env python
"""Run real, unmodified kohya-ss sd-scripts FLUX.1 network training (``flux_train_network.py``) on a
CPU-only machine without weights.

Our own code; nothing from sd-scripts is copied. sd-scripts is imported from a checkout given with
``--sd-scripts`` and driven through its own ``flux_train_network.setup_parser()`` and
``FluxNetworkTrainer.train()``. The only change is where the models come from: the trainer subclass
overrides ``load_target_model`` so that, while sd-scripts' own ``load_target_model`` runs, its four
checkpoint readers (``library.flux_utils.load_flow_model / load_clip_l / load_t5xxl / load_ae``)
return randomly initialised models of the real classes instead of reading files:

* DiT: sd-scripts' ``library.flux_models.Flux(FluxParams(...))`` (``--flux-size``: ``tiny`` =
  hidden 128, 2 double + 2 single blocks; presets up to the real width, or ``HIDDEN:DOUBLE:SINGLE``);
  ``axes_dim`` always sums to the head dim, mlp_ratio 4, qkv_bias, guidance embedding for ``dev``.
* CLIP-L: ``transformers.CLIPTextModel`` and T5: ``transformers.T5EncoderModel`` from configs,
  2 layers each (``--te-size small``: 128 wide; ``real``: the real widths 768 / 4096).
* AE: sd-scripts' ``library.flux_models.AutoEncoder`` at its smallest (ch 32, 4 levels = 8x
  downsampling, 16 latent channels).

Everything after loading is sd-scripts' code: fp8 casting (``--fp8-base``), block swap
(``--blocks-to-swap``), latent / text-encoder caching, tokenisation, sigma sampling, the DiT call,
``create_network`` / ``apply_to`` / optimizer groups, accelerate, sample images and saving.

A dummy ``random-init-flux1-<variant>.safetensors`` holding only the key *names* sd-scripts'
``analyze_checkpoint_state`` inspects (dev vs schnell, block counts) is written and passed as
``--pretrained_model_name_or_path``; no weight is read from it. Tokenizers are built offline and
saved under ``--tokenizer_cache_dir``: a byte-level CLIPTokenizer (byte table from
``tlora_trainer.tokenizers``; the real special-token ids 49406/49407) and a character-level
``T5TokenizerFast`` (``<pad>``=0, ``</s>``=1, ``<unk>``=2).

Observation-only probes (they never change a value): per-step wall/CPU time; the keyword arguments
the DiT receives (``timesteps``, ``guidance`` ...) and its train/eval mode; the input dtype of two
adapted Linears and whether they run inside backward (checkpoint recomputation); which network
attributes sd-scripts' files read (the network's class is swapped for a subclass that logs
attribute reads made from sd-scripts' files); the saved file's keys and metadata.

Usage (with the sd-scripts venv python; see bench/sd_scripts_run.md for the venv):

    python bench/sd_scripts_flux_harness.py --network-module networks.lora_flux --steps 4
    python bench/sd_scripts_flux_harness.py --network-module networks.lora_flux --steps 3 --gradient-checkpointing
    python bench/sd_scripts_flux_harness.py --network-module networks.tlora --steps 2
    python bench/sd_scripts_flux_harness.py --network-module networks.lora_flux --steps 2 \
        --mixed-precision bf16 --fp8-base
    python bench/sd_scripts_flux_harness.py --network-module networks.lora_flux --steps 2 \
        --flux-size 128:3:4 --blocks-to-swap 2
    python bench/sd_scripts_flux_harness.py --flux-size medium --network-module networks.lora_flux --steps 3

Everything after ``--extra`` is appended verbatim to the sd-scripts command line. Results are printed
as ``HARNESS_SUMMARY {...}`` / ``HARNESS_RESULT {...}`` lines and written to ``<workdir>/result.json``
(and ``--json-out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT_ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import sd_scripts_harness as base  # noqa: E402  (our SD harness: paths, namespace check, dataset, file summary)

sys.path.remove(HERE)  # bench/ must not shadow modules that sd-scripts or its dependencies import

CLIP_DIR = "openai_clip-vit-large-patch14"
T5_DIR = "google_t5-v1_1-xxl"

# name: (hidden, double blocks, single blocks)
FLUX_SIZES = {
    "tiny": (128, 2, 2),
    "small": (512, 2, 4),
    "medium": (1024, 4, 8),
    "large": (2048, 4, 8),
    "wide": (3072, 1, 2),  # the real FLUX.1 width, few blocks
    "wide4": (3072, 2, 4),
}


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def parse_harness_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--extra" in argv:
        i = argv.index("--extra")
        argv, extra = argv[:i], argv[i + 1 :]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sd-scripts", default=os.environ.get("SD_SCRIPTS", "/work/sd-scripts"))
    p.add_argument("--project-root", default=PROJECT_ROOT)
    p.add_argument("--network-module", default="networks.lora_flux")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--network-dim", type=int, default=4)
    p.add_argument("--network-alpha", type=float, default=1.0)
    p.add_argument("--network-args", nargs="*", default=[], help="k=v pairs passed as --network_args")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--optimizer", default="AdamW")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--flux-size", default="tiny", help=f"{'|'.join(FLUX_SIZES)} or HIDDEN:DOUBLE:SINGLE")
    p.add_argument("--te-size", choices=["small", "real"], default="small",
                   help="small: CLIP/T5 128 wide; real: CLIP-L 768 / T5-XXL 4096 wide (2 layers each)")
    p.add_argument("--flux-variant", choices=["dev", "schnell"], default="dev",
                   help="dev: guidance embedding present (sd-scripts detects it from the dummy checkpoint's key names)")
    p.add_argument("--t5-max-len", type=int, default=32, help="--t5xxl_max_token_length (sd-scripts default 512 dev / 256 schnell)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--cpu-offload-checkpointing", action="store_true")
    p.add_argument("--fp8-base", action="store_true")
    p.add_argument("--blocks-to-swap", type=int, default=0)
    p.add_argument("--unet-only", action="store_true", help="--network_train_unet_only")
    p.add_argument("--cache-te", action="store_true", help="--cache_text_encoder_outputs")
    p.add_argument("--no-cache-latents", action="store_true")
    p.add_argument("--apply-t5-attn-mask", action="store_true")
    p.add_argument("--sample", action="store_true", help="sample one 64 px image (3 steps) at the end via --sample_prompts")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--output-name", default="harness_flux")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    args.extra = extra
    return args


def flux_dims(size):
    if size in FLUX_SIZES:
        hidden, depth, single = FLUX_SIZES[size]
    else:
        hidden, depth, single = (int(v) for v in size.split(":"))
    head_dim = 128 if hidden >= 1024 else 64
    assert hidden % head_dim == 0, f"hidden {hidden} must be a multiple of {head_dim}"
    a = head_dim // 8
    b = (head_dim - a) // 2
    axes = [a, b, head_dim - a - b]  # 128 -> [16, 56, 56] like FLUX.1; 64 -> [8, 28, 28]
    assert all(x % 2 == 0 for x in axes), axes
    return {"hidden": hidden, "depth": depth, "single": single, "heads": hidden // head_dim, "axes_dim": axes}


def te_dims(te_size):
    if te_size == "real":
        return {"clip_hidden": 768, "clip_heads": 12, "clip_ff": 3072, "t5_d_model": 4096, "t5_heads": 64, "t5_d_kv": 64,
                "t5_ff": 10240}
    return {"clip_hidden": 128, "clip_heads": 4, "clip_ff": 512, "t5_d_model": 128, "t5_heads": 4, "t5_d_kv": 32, "t5_ff": 256}


# --------------------------------------------------------------------------------------------
# offline tokenizers and the dummy checkpoint
# --------------------------------------------------------------------------------------------
def make_tokenizer_cache(root):
    """CLIP: byte-level vocabulary, no merges, real special ids. T5: one token per character."""
    if PROJECT_ROOT not in sys.path:
        sys.path.append(PROJECT_ROOT)
    from tlora_trainer import tokenizers as tt

    cache = os.path.join(root, "tokenizers")
    clip = tt.clip_tokenizer(special_ids={tt.START_TOKEN: 49406, tt.END_TOKEN: 49407}, model_max_length=77)
    clip.save_pretrained(os.path.join(cache, CLIP_DIR))
    ids = clip("a photo of sks dog", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and 49407 in ids, ids[:10]

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for c in ["\u2581"] + [chr(i) for i in range(33, 127)]:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Split(Regex("."), "isolated")])
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)
    t5.save_pretrained(os.path.join(cache, T5_DIR))
    enc = t5("a photo of sks dog", padding="max_length", max_length=32)
    assert enc.input_ids[-1] == 0 and 1 in enc.input_ids and 2 not in enc.input_ids, enc.input_ids
    return cache, len(vocab)


def make_dummy_checkpoint(root, dims, variant):
    """A safetensors file whose key NAMES tell sd-scripts' analyze_checkpoint_state the variant and the
    block counts (tensors are 1-element placeholders; nothing is loaded from it)."""
    import torch
    from safetensors.torch import save_file

    sd = {}
    for i in range(dims["depth"]):
        sd[f"double_blocks.{i}.img_attn.proj.bias"] = torch.zeros(1)
    for i in range(dims["single"]):
        sd[f"single_blocks.{i}.modulation.lin.bias"] = torch.zeros(1)
    if variant == "dev":
        sd["guidance_in.in_layer.bias"] = torch.zeros(1)
    path = os.path.join(root, f"random-init-flux1-{variant}.safetensors")
    save_file(sd, path)
    return path


# --------------------------------------------------------------------------------------------
# random models of the real classes
# --------------------------------------------------------------------------------------------
def build_flux(dims, ted, variant):
    from library import flux_models

    params = flux_models.FluxParams(
        in_channels=64, vec_in_dim=ted["clip_hidden"], context_in_dim=ted["t5_d_model"], hidden_size=dims["hidden"],
        mlp_ratio=4.0, num_heads=dims["heads"], depth=dims["depth"], depth_single_blocks=dims["single"],
        axes_dim=dims["axes_dim"], theta=10_000, qkv_bias=True, guidance_embed=(variant == "dev"),
    )
    return flux_models.Flux(params)


def build_clip_l(ted):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=ted["clip_hidden"], intermediate_size=ted["clip_ff"], num_hidden_layers=2,
        num_attention_heads=ted["clip_heads"], max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=ted["clip_hidden"], pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    return CLIPTextModel(cfg)


def build_t5(ted, vocab_size):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=max(128, vocab_size), d_model=ted["t5_d_model"], d_kv=ted["t5_d_kv"], d_ff=ted["t5_ff"], num_layers=2,
        num_heads=ted["t5_heads"], relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
        use_cache=False, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    return T5EncoderModel(cfg)


def build_ae():
    from library import flux_models

    p = flux_models.AutoEncoderParams(
        resolution=256, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=16,
        scale_factor=0.3611, shift_factor=0.1159,
    )
    return flux_models.AutoEncoder(p)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------------------------
# observation probes
# --------------------------------------------------------------------------------------------
def _desc(t, n=8):
    import torch

    if torch.is_tensor(t):
        flat = t.detach().reshape(-1)
        return {"shape": list(t.shape), "dtype": str(t.dtype), "values": [round(float(v), 6) for v in flat[:n].float()]}
    return repr(t)


def _in_backward():
    import torch

    try:
        return torch._C._current_graph_task_id() != -1
    except Exception:  # pragma: no cover - private API
        return None


def install_model_probes(flux, record):
    import torch

    def dit_probe(module, pargs, kwargs):
        calls = record.setdefault("dit_calls", [])
        if len(calls) >= 12:
            return
        calls.append({
            "positional_args": len(pargs),
            "kwargs": sorted(kwargs),
            "img": _desc(kwargs.get("img"), 0),
            "txt": _desc(kwargs.get("txt"), 0),
            "timesteps": _desc(kwargs.get("timesteps")),
            "guidance": _desc(kwargs.get("guidance"), 4),
            "txt_attention_mask_is_none": kwargs.get("txt_attention_mask") is None,
            "mod_vectors_is_none": kwargs.get("mod_vectors") is None,
            "model_training": module.training,
            "grad_enabled": torch.is_grad_enabled(),
            "autocast_cpu": torch.is_autocast_enabled("cpu") if hasattr(torch, "is_autocast_enabled") else None,
        })

    flux.register_forward_pre_hook(dit_probe, with_kwargs=True)

    targets = {"double_blocks.0.img_attn.qkv": flux.double_blocks[0].img_attn.qkv,
               "single_blocks.0.linear1": flux.single_blocks[0].linear1,
               "double_blocks.0.img_mod.lin": flux.double_blocks[0].img_mod.lin}

    def make_linear_probe(name):
        def probe(module, pargs):
            stats = record.setdefault("linear_calls", {}).setdefault(name, {"calls": 0, "calls_in_backward": 0, "seen": []})
            stats["calls"] += 1
            if _in_backward():
                stats["calls_in_backward"] += 1
            x = pargs[0]
            item = {"x_dtype": str(x.dtype), "x_shape": list(x.shape), "weight_dtype": str(module.weight.dtype),
                    "weight_device": str(module.weight.device), "grad_enabled": torch.is_grad_enabled(),
                    "forward_replaced": "forward" in module.__dict__,
                    "forward_owner": type(getattr(module.forward, "__self__", None)).__name__}
            if item not in stats["seen"] and len(stats["seen"]) < 6:
                stats["seen"].append(item)

        return probe

    for name, mod in targets.items():
        mod.register_forward_pre_hook(make_linear_probe(name))


def attribute_logging_class(cls, record, sd_scripts):
    """A subclass of the network's class whose __getattribute__ records names read from sd-scripts' files."""
    sd_root = os.path.abspath(sd_scripts) + os.sep
    seen = record.setdefault("network_attribute_reads", {})

    def __getattribute__(self, name):
        if not name.startswith("__"):
            f = sys._getframe(1)
            fname = f.f_code.co_filename
            if fname.startswith(sd_root) and not fname.startswith(sd_root + "networks" + os.sep):
                where = f"{os.path.relpath(fname, sd_root)}:{f.f_lineno}"
                lst = seen.setdefault(name, [])
                if where not in lst and len(lst) < 6:
                    lst.append(where)
        return super(logged, self).__getattribute__(name)

    logged = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
    return logged


# --------------------------------------------------------------------------------------------
# the trainer subclass
# --------------------------------------------------------------------------------------------
def make_trainer(h, dims, ted, t5_vocab, record):
    import flux_train_network
    from library import flux_utils

    class RandomWeightFluxTrainer(flux_train_network.FluxNetworkTrainer):
        """FluxNetworkTrainer whose only change is where the models come from (plus observation probes)."""

        def load_target_model(self, args, weight_dtype, accelerator):
            made = {}

            def load_flow_model(ckpt_path, dtype, device, disable_mmap=False, model_type="flux"):
                assert model_type == "flux", "the harness builds FLUX.1 only"
                model = build_flux(dims, ted, h.flux_variant)
                if dtype is not None:
                    model = model.to(dtype)
                made["flux"] = model
                return h.flux_variant == "schnell", model

            def load_clip_l(ckpt_path, dtype, device, disable_mmap=False, state_dict=None):
                m = build_clip_l(ted)
                made["clip_l"] = m
                return m.to(dtype) if dtype is not None else m

            def load_t5xxl(ckpt_path, dtype, device, disable_mmap=False, state_dict=None):
                m = build_t5(ted, t5_vocab)
                made["t5xxl"] = m
                return m.to(dtype) if dtype is not None else m

            def load_ae(ckpt_path, dtype, device, disable_mmap=False):
                m = build_ae()
                made["ae"] = m
                return m.to(dtype) if dtype is not None else m

            saved = {n: getattr(flux_utils, n) for n in ("load_flow_model", "load_clip_l", "load_t5xxl", "load_ae")}
            flux_utils.load_flow_model, flux_utils.load_clip_l = load_flow_model, load_clip_l
            flux_utils.load_t5xxl, flux_utils.load_ae = load_t5xxl, load_ae
            t0 = time.perf_counter()
            try:
                out = super().load_target_model(args, weight_dtype, accelerator)  # sd-scripts' own code
            finally:
                for n, f in saved.items():
                    setattr(flux_utils, n, f)
            record["models"] = {
                "flux_params": {k: (v if not isinstance(v, list) else list(v)) for k, v in vars(made["flux"].params).items()},
                "flux_M_params": round(n_params(made["flux"]) / 1e6, 3),
                "clip_l_M_params": round(n_params(made["clip_l"]) / 1e6, 3),
                "t5_M_params": round(n_params(made["t5xxl"]) / 1e6, 3),
                "ae_M_params": round(n_params(made["ae"]) / 1e6, 3),
                "flux_dtype_after_load": str(next(made["flux"].parameters()).dtype),
                "build_seconds": round(time.perf_counter() - t0, 2),
                "model_version": out[0],
            }
            print(f"[harness] random FLUX models: {record['models']}", flush=True)
            install_model_probes(out[3], record)
            return out

        def post_process_network(self, args, accelerator, network, text_encoders, unet):
            record["network_class"] = f"{type(network).__module__}.{type(network).__qualname__}"
            try:
                super().post_process_network(args, accelerator, network, text_encoders, unet)
            finally:
                record["trainer_train_t5xxl"] = getattr(self, "train_t5xxl", None)
                record["trainer_train_clip_l"] = getattr(self, "train_clip_l", None)
            orig_save = network.save_weights

            def save_weights(file, dtype, metadata):
                if "train_end" not in record:
                    record["train_end"] = time.perf_counter()
                    record["train_end_cpu"] = time.process_time()
                try:
                    record["trainable_params"] = int(sum(p.numel() for p in network.get_trainable_params()))
                except Exception as e:  # pragma: no cover - informative only
                    record["trainable_params"] = f"error: {e!r}"
                record["save_weights_dtype"] = str(dtype)
                record.setdefault("saved_files", []).append(os.path.abspath(file))
                return orig_save(file, dtype, metadata)

            network.save_weights = save_weights

        def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=True):
            if is_train:
                record.setdefault("step_starts", []).append(time.perf_counter())
                record.setdefault("step_starts_cpu", []).append(time.process_time())
                record.setdefault("loadavg", []).append(round(os.getloadavg()[0], 2))
            return super().on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train)

    return RandomWeightFluxTrainer()


def sd_scripts_argv(h, ckpt, data_dir, tok_cache, out_dir, work):
    argv = [
        "--pretrained_model_name_or_path", ckpt,
        "--clip_l", "random-init-clip_l", "--t5xxl", "random-init-t5xxl", "--ae", "random-init-ae",  # never opened
        "--train_data_dir", data_dir,
        "--tokenizer_cache_dir", tok_cache,
        "--output_dir", out_dir,
        "--output_name", h.output_name,
        "--save_model_as", "safetensors",
        "--resolution", str(h.resolution),
        "--train_batch_size", str(h.batch_size),
        "--max_train_steps", str(h.steps),
        "--learning_rate", str(h.learning_rate),
        "--optimizer_type", h.optimizer,
        "--network_module", h.network_module,
        "--network_dim", str(h.network_dim),
        "--network_alpha", str(h.network_alpha),
        "--mixed_precision", h.mixed_precision,
        "--max_data_loader_n_workers", "0",
        "--seed", str(h.seed),
        "--caption_extension", ".txt",
        "--t5xxl_max_token_length", str(h.t5_max_len),
        "--sdpa",
    ]
    switches = {"--cache_latents": not h.no_cache_latents, "--cache_text_encoder_outputs": h.cache_te,
                "--network_train_unet_only": h.unet_only, "--gradient_checkpointing": h.gradient_checkpointing,
                "--cpu_offload_checkpointing": h.cpu_offload_checkpointing, "--fp8_base": h.fp8_base}
    argv += [flag for flag, on in switches.items() if on]
    if h.blocks_to_swap:
        argv += ["--blocks_to_swap", str(h.blocks_to_swap)]
    if h.apply_t5_attn_mask:
        argv.append("--apply_t5_attn_mask")
    if h.sample:
        prompts = os.path.join(work, "sample_prompts.txt")
        with open(prompts, "w") as f:
            f.write("a photo of sks dog --w 64 --h 64 --s 3 --d 7 --g 3.5\n")
        argv += ["--sample_prompts", prompts, "--sample_every_n_steps", str(h.steps)]
    if h.network_args:
        argv += ["--network_args", *h.network_args]
    return argv + list(h.extra)


def summarize(path):
    from safetensors import safe_open

    s = base.summarize_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        s["shapes_of_first_layer"] = {k: list(f.get_slice(k).get_shape()) for k in keys if "double_blocks_0_img_attn_qkv" in k}
    s["module_names"] = sorted({k.split(".", 1)[0] for k in keys})
    s["metadata_flux"] = {k: meta[k] for k in sorted(meta) if k.startswith("modelspec.") or k in (
        "ss_base_model_version", "ss_model_type", "ss_network_module", "ss_network_args", "ss_network_dim",
        "ss_network_alpha", "ss_guidance_scale", "ss_timestep_sampling", "ss_discrete_flow_shift",
        "ss_model_prediction_type", "ss_apply_t5_attn_mask", "ss_weighting_scheme", "ss_mixed_precision", "ss_fp8_base",
        "ss_training_comment", "ss_v2")}
    s["metadata_keys"] = sorted(meta)
    return s


def main(argv=None):
    h = parse_harness_args(argv)
    sd_scripts, project_root = base.setup_paths(h.sd_scripts, h.project_root)
    import torch

    if h.threads:
        torch.set_num_threads(h.threads)
    dims = flux_dims(h.flux_size)
    ted = te_dims(h.te_size)

    work = os.path.abspath(h.workdir) if h.workdir else tempfile.mkdtemp(prefix="sdh_flux_")
    os.makedirs(work, exist_ok=True)
    result = {
        "model": "flux", "flux_size": h.flux_size, "flux_dims": dims, "te_size": h.te_size, "variant": h.flux_variant,
        "network_module": h.network_module, "network_args": h.network_args, "network_dim": h.network_dim,
        "network_alpha": h.network_alpha, "steps": h.steps, "batch_size": h.batch_size, "resolution": h.resolution,
        "mixed_precision": h.mixed_precision, "gradient_checkpointing": h.gradient_checkpointing,
        "cpu_offload_checkpointing": h.cpu_offload_checkpointing, "fp8_base": h.fp8_base,
        "blocks_to_swap": h.blocks_to_swap, "unet_only": h.unet_only, "cache_te": h.cache_te, "workdir": work,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    try:
        import subprocess

        import accelerate
        import diffusers
        import transformers

        result["versions"] = {"accelerate": accelerate.__version__, "diffusers": diffusers.__version__,
                              "transformers": transformers.__version__}
        result["sd_scripts_commit"] = subprocess.run(["git", "-C", sd_scripts, "rev-parse", "HEAD"], capture_output=True,
                                                     text=True).stdout.strip()
    except Exception:
        pass

    record = {}
    status = "ok"
    try:
        result["namespace"] = base.check_namespace_merge(h.network_module, sd_scripts, project_root)
        print("[harness] namespace merge:", json.dumps(result["namespace"]), flush=True)

        data_dir = base.make_dataset(work, h.resolution)
        tok_cache, t5_vocab = make_tokenizer_cache(work)
        ckpt = make_dummy_checkpoint(work, dims, h.flux_variant)
        out_dir = os.path.join(work, "out")

        import importlib

        import flux_train_network as ftn
        from library import train_util

        # observation only: log which attributes sd-scripts reads on the network object
        netmod = importlib.import_module(h.network_module)
        orig_create = netmod.create_network

        def create_network(*a, **k):
            record["create_network_kwargs"] = {key: (v if isinstance(v, (str, int, float, type(None))) else repr(v))
                                               for key, v in k.items()}
            record["create_network_positional_types"] = [type(x).__name__ if not isinstance(x, list)
                                                         else [type(y).__name__ for y in x] for x in a]
            net = orig_create(*a, **k)
            if net is not None:
                try:
                    net.__class__ = attribute_logging_class(type(net), record, sd_scripts)
                except TypeError as e:  # pragma: no cover
                    record["attribute_logging_error"] = repr(e)
            return net

        netmod.create_network = create_network

        argv_sd = sd_scripts_argv(h, ckpt, data_dir, tok_cache, out_dir, work)
        result["sd_scripts_cmdline"] = "flux_train_network.py " + " ".join(f"'{a}'" if " " in a else a for a in argv_sd)
        print("[harness] " + result["sd_scripts_cmdline"], flush=True)

        parser = ftn.setup_parser()
        args = parser.parse_args(argv_sd)
        train_util.verify_command_line_training_args(args)
        args = train_util.read_config_from_file(args, parser)
        trainer = make_trainer(h, dims, ted, t5_vocab, record)

        t0 = time.perf_counter()
        try:
            trainer.train(args)
        finally:
            netmod.create_network = orig_create
        result["train_call_seconds"] = round(time.perf_counter() - t0, 2)
    except BaseException as e:  # noqa: BLE001 - record SystemExit too
        status = "train_failed"
        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr, flush=True)
        if isinstance(e, KeyboardInterrupt):
            raise

    starts = record.get("step_starts", [])
    if starts:
        ends = starts[1:] + ([record["train_end"]] if "train_end" in record else [])
        steps = [round(b - a, 3) for a, b in zip(starts, ends)]
        result["step_seconds"] = steps
        later = steps[1:] if len(steps) > 1 else steps
        result["mean_step_seconds_excl_first"] = round(sum(later) / len(later), 3) if later else None
        cs = record.get("step_starts_cpu", [])
        cends = cs[1:] + ([record["train_end_cpu"]] if "train_end_cpu" in record else [])
        csteps = [round(b - a, 3) for a, b in zip(cs, cends)]
        result["step_cpu_seconds"] = csteps
        clater = csteps[1:] if len(csteps) > 1 else csteps
        result["mean_step_cpu_seconds_excl_first"] = round(sum(clater) / len(clater), 3) if clater else None
        result["loadavg_at_step_start"] = record.get("loadavg")
    result["steps_run"] = len(starts)
    for k in ("models", "network_class", "trainer_train_t5xxl", "trainer_train_clip_l", "create_network_kwargs",
              "create_network_positional_types", "dit_calls", "linear_calls", "network_attribute_reads",
              "trainable_params", "save_weights_dtype", "saved_files"):
        if k in record:
            result[k] = record[k]
    final = os.path.join(work, "out", h.output_name + ".safetensors")
    if os.path.exists(final):
        result["saved_file"] = summarize(final)
    elif status == "ok":
        status = "no_output_file"
    samples = os.path.join(work, "out", "sample")
    if os.path.isdir(samples):
        result["sample_images"] = sorted(os.path.join(samples, f) for f in os.listdir(samples))
    result["status"] = status
    base.record_peak_rss(result)
    short = {k: result.get(k) for k in ("status", "flux_size", "network_module", "network_args", "mixed_precision",
                                        "gradient_checkpointing", "fp8_base", "blocks_to_swap", "step_seconds",
                                        "mean_step_seconds_excl_first", "step_cpu_seconds",
                                        "mean_step_cpu_seconds_excl_first", "trainable_params", "peak_rss_gb")}
    short["saved_file"] = (result.get("saved_file") or {}).get("file")
    short["error_tail"] = result.get("error", "").strip().splitlines()[-1:] if result.get("error") else None
    base.publish(result, short, work, h.json_out)
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
