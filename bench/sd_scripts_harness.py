#!/usr/bin/env python
"""Run real, unmodified kohya-ss sd-scripts network training on a CPU-only machine without weights.

Our own code. Nothing from sd-scripts is copied here: sd-scripts is imported from a checkout given
with ``--sd-scripts`` and driven through its own argument parser and ``NetworkTrainer.train()``.
Only the model *loading* is replaced: the trainer subclass overrides ``load_target_model`` and
returns randomly initialised models of the real architectures:

* SD 1.5: sd-scripts' ``library.original_unet.UNet2DConditionModel(64, 8, 768, False, False)``
  and a ``transformers.CLIPTextModel`` with the ViT-L/14 text-tower sizes (768 wide, 12 layers).
* SDXL: sd-scripts' ``library.sdxl_original_unet.SdxlUNet2DConditionModel()``, CLIP ViT-L text
  tower + ``CLIPTextModelWithProjection`` with the bigG sizes (1280 wide, 32 layers, 20 heads).
* VAE: a small diffusers ``AutoencoderKL`` (4 latent channels, 8x downsampling); ``--full-vae``
  uses the real SD VAE layout instead (still random).

The tokenizers are CLIPTokenizers built offline from a byte-level vocabulary with no merges (the
CLIP special tokens keep their real ids 49406/49407) and are saved where sd-scripts' own
``--tokenizer_cache_dir`` logic looks for them.

The project root (parent of ``bench/``) is put on sys.path *after* sd-scripts, so that the two
``networks/`` directories (neither has ``__init__.py``) merge into one namespace package:
``networks.lora`` comes from sd-scripts, ``networks.tlora`` from this project. The harness checks
that merge before training.

Usage (with the sd-scripts venv python):

    python bench/sd_scripts_harness.py --sd-scripts /work/sd-scripts --model sd1 \
        --network-module networks.tlora --steps 4 --network-args algo=tlora min_rank=2 \
        [--gradient-checkpointing] [--unet-only] [--gen-img] [--extra --some_sd_scripts_flag v]

Everything after ``--extra`` is appended verbatim to the sd-scripts command line (so it can
override the defaults chosen here).  Results (per-step times, saved file, key counts, optional
gen_img output) are printed as a final ``HARNESS_RESULT {json}`` line and written to
``<workdir>/result.json`` (and ``--json-out`` if given).
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

TOKENIZER_DIRS = {
    "sd1": ["openai_clip-vit-large-patch14"],
    "sdxl": ["openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"],
}


# --------------------------------------------------------------------------------------------
# command line of the harness
# --------------------------------------------------------------------------------------------
def parse_harness_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--extra" in argv:
        i = argv.index("--extra")
        argv, extra = argv[:i], argv[i + 1 :]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sd-scripts", default=os.environ.get("SD_SCRIPTS", "/work/sd-scripts"))
    p.add_argument("--project-root", default=PROJECT_ROOT, help="directory holding our networks/ (default: repo root)")
    p.add_argument("--model", choices=["sd1", "sdxl"], default="sd1")
    p.add_argument("--network-module", default="networks.lora")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--network-dim", type=int, default=4)
    p.add_argument("--network-alpha", type=float, default=1.0)
    p.add_argument("--network-args", nargs="*", default=[], help="k=v pairs passed as --network_args")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--optimizer", default="AdamW")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--unet-only", action="store_true", help="--network_train_unet_only")
    p.add_argument("--no-sdpa", action="store_true", help="do not pass --sdpa (sd-scripts then uses its own attention)")
    p.add_argument("--no-cache-latents", action="store_true", help="encode with the VAE at every step")
    p.add_argument("--full-vae", action="store_true", help="random VAE with the real SD layout instead of a tiny one")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave default)")
    p.add_argument("--workdir", default=None, help="default: a fresh temp dir")
    p.add_argument("--output-name", default="harness_net")
    p.add_argument("--json-out", default=None)
    p.add_argument("--gen-img", action="store_true", help="afterwards run sd-scripts gen_img.py main() with the saved file")
    p.add_argument("--gen-steps", type=int, default=4)
    p.add_argument("--gen-network-args", default=None,
                   help="';'-separated k=v for gen_img (default: none; gen_img reads the file's own metadata only if the module does)")
    p.add_argument("--gen-extra", nargs="*", default=[], help="extra gen_img.py flags, e.g. --gen-extra=--network_merge")
    args = p.parse_args(argv)
    args.extra = extra
    return args


# --------------------------------------------------------------------------------------------
# sys.path / namespace package
# --------------------------------------------------------------------------------------------
def setup_paths(sd_scripts, project_root):
    sd_scripts = os.path.abspath(sd_scripts)
    project_root = os.path.abspath(project_root)
    for d in (sd_scripts, project_root):
        if os.path.exists(os.path.join(d, "networks", "__init__.py")):
            raise SystemExit(
                f"{d}/networks/__init__.py exists: networks/ would be a regular package and shadow the other "
                "networks/ directory; the namespace merge needs both without __init__.py"
            )
    # sd-scripts first (its train_network.py also appends its own dir), then our project root
    for d in (project_root, sd_scripts):
        while d in sys.path:
            sys.path.remove(d)
    sys.path.insert(0, sd_scripts)
    sys.path.append(project_root)
    return sd_scripts, project_root


def check_namespace_merge(network_module, sd_scripts, project_root):
    import importlib

    import networks

    portions = [os.path.abspath(p) for p in networks.__path__]
    info = {"networks.__path__": portions}
    assert os.path.join(sd_scripts, "networks") in portions, portions
    if os.path.isdir(os.path.join(project_root, "networks")):
        assert os.path.join(project_root, "networks") in portions, portions
    lora = importlib.import_module("networks.lora")
    info["networks.lora"] = os.path.abspath(lora.__file__)
    mod = importlib.import_module(network_module)
    info[network_module] = os.path.abspath(mod.__file__)
    for fn in ("create_network", "create_network_from_weights"):
        info[f"has_{fn}"] = hasattr(mod, fn)
    return info


# --------------------------------------------------------------------------------------------
# tiny dataset and offline tokenizers
# --------------------------------------------------------------------------------------------
def make_dataset(root, resolution):
    import numpy as np
    from PIL import Image

    d = os.path.join(root, "img", "1_sks dog")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:resolution, 0:resolution] / max(resolution - 1, 1)
    captions = ["a photo of sks dog", "sks dog sitting on grass"]
    for i, cap in enumerate(captions):
        base = np.stack([xx * (i + 1) % 1.0, yy, 0.5 * (xx + yy)], axis=-1)
        img = np.clip(base * 255 + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img, "RGB").save(os.path.join(d, f"img{i}.png"))
        with open(os.path.join(d, f"img{i}.txt"), "w") as f:
            f.write(cap)
    return os.path.join(root, "img")


def make_tokenizer_cache(root, model):
    """CLIPTokenizer with a byte-level vocabulary and no merges: every word becomes its bytes."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    cache = os.path.join(root, "tokenizers")
    src = os.path.join(root, "tokenizer_src")
    os.makedirs(src, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    # pad to the real CLIP layout so that <|startoftext|>=49406 and <|endoftext|>=49407
    i = 0
    while len(vocab) < 49406:
        vocab[f"<|unused{i}|>"] = len(vocab)
        i += 1
    vocab["<|startoftext|>"] = 49406
    vocab["<|endoftext|>"] = 49407
    with open(os.path.join(src, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(src, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt"), model_max_length=77)
    for name in TOKENIZER_DIRS[model]:
        tok.save_pretrained(os.path.join(cache, name))
    ids = tok("a photo of sks dog", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and 49407 in ids, ids[:10]
    return cache


# --------------------------------------------------------------------------------------------
# random models of the real architectures
# --------------------------------------------------------------------------------------------
def clip_l_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )


def clip_bigg_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )


def make_vae(full):
    from diffusers import AutoencoderKL

    if full:
        from library import model_util

        return AutoencoderKL(**model_util.create_vae_diffusers_config())
    # 4 blocks -> 3 downsamplings = 8x, 4 latent channels, like the SD VAE but tiny
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        sample_size=64,
    )


def build_models(model, full_vae=False):
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    t0 = time.perf_counter()
    if model == "sd1":
        from library.original_unet import UNet2DConditionModel

        # (sample_size, attention_head_dim, cross_attention_dim, use_linear_projection, upcast_attention)
        unet = UNet2DConditionModel(64, 8, 768, False, False)
        text_encoders = [CLIPTextModel(clip_l_config())]
    else:
        from library.sdxl_original_unet import SdxlUNet2DConditionModel

        unet = SdxlUNet2DConditionModel()
        text_encoders = [CLIPTextModel(clip_l_config()), CLIPTextModelWithProjection(clip_bigg_config())]
    vae = make_vae(full_vae)
    for m in [unet, vae, *text_encoders]:
        m.to(torch.float32)
    print(f"[harness] random {model} models built in {time.perf_counter() - t0:.1f}s: "
          f"unet {sum(p.numel() for p in unet.parameters())/1e6:.1f}M params, "
          f"text encoders {[round(sum(p.numel() for p in t.parameters())/1e6, 1) for t in text_encoders]}M, "
          f"vae {sum(p.numel() for p in vae.parameters())/1e6:.2f}M", flush=True)
    return unet, text_encoders, vae


# --------------------------------------------------------------------------------------------
# trainer subclasses
# --------------------------------------------------------------------------------------------
def make_trainer(model, full_vae, record):
    from library import train_util

    if model == "sd1":
        import train_network

        base = train_network.NetworkTrainer
    else:
        import sdxl_train_network

        base = sdxl_train_network.SdxlNetworkTrainer

    class RandomWeightTrainer(base):
        """sd-scripts trainer whose only change is where the models come from (plus timing probes)."""

        def load_target_model(self, args, weight_dtype, accelerator):
            unet, text_encoders, vae = build_models(model, full_vae)
            # probe only: what sd-scripts passes to the U-Net as the timestep (first calls)
            def probe(module, pargs, pkwargs):
                calls = record.setdefault("unet_calls", [])
                if len(calls) < 8:
                    import torch

                    t = pkwargs.get("timesteps", pkwargs.get("timestep", pargs[1] if len(pargs) > 1 else None))
                    desc = (list(t.shape), t.dtype.__repr__(), t.reshape(-1)[:8].tolist()) if torch.is_tensor(t) else repr(t)
                    calls.append({"timesteps": desc, "grad_enabled": torch.is_grad_enabled()})

            unet.register_forward_pre_hook(probe, with_kwargs=True)
            # what sd-scripts' own load_target_model does after loading
            train_util.replace_unet_modules(unet, args.mem_eff_attn, args.xformers, args.sdpa)
            if model == "sd1":
                from library import model_util

                version = model_util.get_model_version_str_for_sd1_sd2(args.v2, args.v_parameterization)
                return version, text_encoders[0], vae, unet
            from library import sdxl_model_util

            self.load_stable_diffusion_format = True
            self.logit_scale = None
            self.ckpt_info = None
            return sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, text_encoders, vae, unet

        def post_process_network(self, args, accelerator, network, text_encoders, unet):
            super().post_process_network(args, accelerator, network, text_encoders, unet)
            record["network_class"] = f"{type(network).__module__}.{type(network).__qualname__}"
            orig_save = network.save_weights

            def save_weights(file, dtype, metadata):
                if "train_end" not in record:
                    record["train_end"] = time.perf_counter()
                    record["train_end_cpu"] = time.process_time()
                try:
                    record["trainable_params"] = int(sum(p.numel() for p in network.get_trainable_params()))
                except Exception as e:  # pragma: no cover - informative only
                    record["trainable_params"] = f"error: {e!r}"
                record.setdefault("saved_files", []).append(os.path.abspath(file))
                return orig_save(file, dtype, metadata)

            network.save_weights = save_weights

        def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=True):
            if is_train:
                record.setdefault("step_starts", []).append(time.perf_counter())
                record.setdefault("step_starts_cpu", []).append(time.process_time())
                record.setdefault("loadavg", []).append(round(os.getloadavg()[0], 2))
            return super().on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train)

    return RandomWeightTrainer()


def sd_scripts_argv(h, work, data_dir, tok_cache, out_dir):
    argv = [
        "--pretrained_model_name_or_path", f"random-init-{h.model}",  # never opened: load_target_model is overridden
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
        "--mixed_precision", "no",
        "--max_data_loader_n_workers", "0",
        "--seed", str(h.seed),
        "--caption_extension", ".txt",
    ]
    if not h.no_sdpa:
        argv.append("--sdpa")
    if not h.no_cache_latents:
        argv.append("--cache_latents")
    if h.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    if h.unet_only:
        argv.append("--network_train_unet_only")
    if h.network_args:
        argv += ["--network_args", *h.network_args]
    return argv + list(h.extra)


# --------------------------------------------------------------------------------------------
# optional: sd-scripts' gen_img.py main() with the saved file
# --------------------------------------------------------------------------------------------
def run_gen_img(h, work, tok_cache, weights_file):
    import gen_img
    from library import model_util, sdxl_train_util

    unet, text_encoders, vae = build_models(h.model, h.full_vae)
    dummy_ckpt = os.path.join(work, f"random-{h.model}.safetensors")
    open(dummy_ckpt, "wb").close()  # must exist (selects the single-file loading path); never read

    # replace only the checkpoint readers gen_img calls; everything after loading is sd-scripts' code
    model_util.load_models_from_stable_diffusion_checkpoint = lambda v2, path, *a, **k: (text_encoders[0], vae, unet)
    sdxl_train_util._load_target_model = lambda *a, **k: (True, text_encoders[0], text_encoders[1], vae, unet, None, None)

    # observe (not change) what gen_img does with our network: the load_state_dict result it logs
    import importlib

    netmod = importlib.import_module(h.network_module)
    observed = {}
    orig_cnfw = netmod.create_network_from_weights

    def create_network_from_weights(*a, **k):
        observed["create_network_from_weights_kwargs"] = sorted(k)
        network, weights_sd = orig_cnfw(*a, **k)
        if network is not None:
            observed["network_class"] = f"{type(network).__module__}.{type(network).__qualname__}"
            orig_lsd = network.load_state_dict

            def load_state_dict(sd, *la, **lk):
                info = orig_lsd(sd, *la, **lk)
                observed["load_state_dict_missing"] = list(getattr(info, "missing_keys", []))[:20]
                observed["load_state_dict_n_missing"] = len(getattr(info, "missing_keys", []))
                observed["load_state_dict_unexpected"] = list(getattr(info, "unexpected_keys", []))[:20]
                observed["load_state_dict_n_unexpected"] = len(getattr(info, "unexpected_keys", []))
                return info

            network.load_state_dict = load_state_dict
            orig_merge = getattr(network, "merge_to", None)
            if orig_merge is not None:

                def merge_to(*ma, **mk):
                    observed["merged"] = True
                    return orig_merge(*ma, **mk)

                network.merge_to = merge_to
        return network, weights_sd

    netmod.create_network_from_weights = create_network_from_weights

    outdir = os.path.join(work, "gen")
    argv = [
        "--ckpt", dummy_ckpt, "--outdir", outdir, "--tokenizer_cache_dir", tok_cache,
        "--W", str(h.resolution), "--H", str(h.resolution), "--steps", str(h.gen_steps),
        "--sampler", "ddim", "--prompt", "a photo of sks dog", "--images_per_prompt", "1", "--batch_size", "1",
        "--seed", str(h.seed), "--network_module", h.network_module, "--network_weights", weights_file,
        "--network_mul", "1.0",
    ]
    argv.append("--sdxl" if h.model == "sdxl" else "--v1")
    if not h.no_sdpa:
        argv.append("--sdpa")
    if h.gen_network_args:
        argv += ["--network_args", h.gen_network_args]
    argv += list(h.gen_extra)
    print("[harness] gen_img.py " + " ".join(argv), flush=True)
    gargs = gen_img.setup_parser().parse_args(argv)
    t0 = time.perf_counter()
    gen_img.main(gargs)
    dt = time.perf_counter() - t0
    images = sorted(os.path.join(outdir, f) for f in os.listdir(outdir) if f.endswith(".png")) if os.path.isdir(outdir) else []
    netmod.create_network_from_weights = orig_cnfw
    return {"gen_img_seconds": round(dt, 2), "gen_img_images": images, "gen_img_argv": argv, "gen_img_observed": observed}


# --------------------------------------------------------------------------------------------
def summarize_file(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata() or {}
        n_params = 0
        for k in keys:
            n = 1
            for s in f.get_slice(k).get_shape():
                n *= s
            n_params += n
    suffixes = {}
    for k in keys:
        s = k.split(".", 1)[1] if "." in k else k
        suffixes[s] = suffixes.get(s, 0) + 1
    prefixes = {}
    for k in keys:
        p = k.split("_", 2)[:2]
        p = "_".join(p)
        prefixes[p] = prefixes.get(p, 0) + 1
    return {
        "file": path,
        "bytes": os.path.getsize(path),
        "n_tensors": len(keys),
        "n_values": n_params,
        "key_suffixes": suffixes,
        "key_prefixes": prefixes,
        "example_keys": keys[:4],
        "metadata_subset": {k: meta[k] for k in sorted(meta) if k in (
            "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
            "modelspec.architecture", "ss_steps", "ss_gradient_checkpointing")},
    }


def main(argv=None):
    h = parse_harness_args(argv)
    sd_scripts, project_root = setup_paths(h.sd_scripts, h.project_root)
    import torch

    if h.threads:
        torch.set_num_threads(h.threads)

    work = os.path.abspath(h.workdir) if h.workdir else tempfile.mkdtemp(prefix=f"sdh_{h.model}_")
    os.makedirs(work, exist_ok=True)
    result = {
        "model": h.model, "network_module": h.network_module, "network_args": h.network_args,
        "network_dim": h.network_dim, "network_alpha": h.network_alpha, "steps": h.steps,
        "batch_size": h.batch_size, "resolution": h.resolution,
        "gradient_checkpointing": h.gradient_checkpointing, "unet_only": h.unet_only, "workdir": work,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    try:
        import accelerate, diffusers, transformers

        result["versions"] = {"accelerate": accelerate.__version__, "diffusers": diffusers.__version__,
                              "transformers": transformers.__version__}
        import subprocess

        result["sd_scripts_commit"] = subprocess.run(
            ["git", "-C", sd_scripts, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except Exception:
        pass

    record = {}
    status = "ok"
    try:
        result["namespace"] = check_namespace_merge(h.network_module, sd_scripts, project_root)
        print("[harness] namespace merge:", json.dumps(result["namespace"]), flush=True)

        data_dir = make_dataset(work, h.resolution)
        tok_cache = make_tokenizer_cache(work, h.model)
        out_dir = os.path.join(work, "out")

        from library import train_util

        if h.model == "sd1":
            import train_network as tn
        else:
            import sdxl_train_network as tn
        argv_sd = sd_scripts_argv(h, work, data_dir, tok_cache, out_dir)
        script = "train_network.py" if h.model == "sd1" else "sdxl_train_network.py"
        result["sd_scripts_cmdline"] = f"{script} " + " ".join(f"'{a}'" if " " in a else a for a in argv_sd)
        print("[harness] " + result["sd_scripts_cmdline"], flush=True)

        parser = tn.setup_parser()
        args = parser.parse_args(argv_sd)
        train_util.verify_command_line_training_args(args)
        args = train_util.read_config_from_file(args, parser)
        trainer = make_trainer(h.model, h.full_vae, record)

        t0 = time.perf_counter()
        trainer.train(args)
        result["train_call_seconds"] = round(time.perf_counter() - t0, 2)

        starts = record.get("step_starts", [])
        if starts:
            ends = starts[1:] + ([record["train_end"]] if "train_end" in record else [])
            steps = [round(b - a, 3) for a, b in zip(starts, ends)]
            result["step_seconds"] = steps
            result["setup_seconds"] = round(starts[0] - t0, 2)
            later = steps[1:] if len(steps) > 1 else steps
            result["mean_step_seconds_excl_first"] = round(sum(later) / len(later), 3) if later else None
            result["median_step_seconds"] = round(sorted(later)[len(later) // 2], 3) if later else None
            # process CPU time per step (all threads): less sensitive to other jobs on the machine than wall time
            cs = record.get("step_starts_cpu", [])
            cends = cs[1:] + ([record["train_end_cpu"]] if "train_end_cpu" in record else [])
            csteps = [round(b - a, 3) for a, b in zip(cs, cends)]
            result["step_cpu_seconds"] = csteps
            clater = csteps[1:] if len(csteps) > 1 else csteps
            result["mean_step_cpu_seconds_excl_first"] = round(sum(clater) / len(clater), 3) if clater else None
            result["loadavg_at_step_start"] = record.get("loadavg")
        result["network_class"] = record.get("network_class")
        result["unet_calls"] = record.get("unet_calls")
        result["trainable_params"] = record.get("trainable_params")
        final = os.path.join(out_dir, h.output_name + ".safetensors")
        if os.path.exists(final):
            result["saved_file"] = summarize_file(final)
        else:
            status = "no_output_file"
        result["steps_run"] = len(starts)

        if h.gen_img and os.path.exists(final):
            import gc

            del trainer, args, parser  # free the training models before building a second set
            gc.collect()
            try:
                result.update(run_gen_img(h, work, tok_cache, final))
            except Exception:
                result["gen_img_error"] = traceback.format_exc()
                status = "gen_img_failed"
                print(result["gen_img_error"], file=sys.stderr, flush=True)
    except BaseException as e:  # noqa: BLE001 - we want to record SystemExit too
        status = "train_failed"
        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr, flush=True)
        if isinstance(e, KeyboardInterrupt):
            raise
    result["status"] = status
    record_peak_rss(result)
    short = {k: result.get(k) for k in ("status", "model", "network_module", "network_args", "gradient_checkpointing",
                                        "unet_only", "step_seconds", "mean_step_seconds_excl_first", "median_step_seconds",
                                        "step_cpu_seconds", "mean_step_cpu_seconds_excl_first", "loadavg_at_step_start",
                                        "trainable_params", "peak_rss_gb")}
    short["saved_file"] = (result.get("saved_file") or {}).get("file")
    if h.gen_img:
        short["gen_img_images"] = result.get("gen_img_images")
        short["gen_img_observed"] = result.get("gen_img_observed")
    publish(result, short, work, h.json_out)
    return 0 if status == "ok" else 1


def record_peak_rss(result) -> None:
    try:
        import resource

        result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    except Exception:
        pass


def publish(result, short, work, json_out=None) -> None:
    """result.json in the work folder (and json_out), then the two lines the drivers parse."""
    js = json.dumps(result, default=str)
    for path in [os.path.join(work, "result.json")] + ([json_out] if json_out else []):
        with open(path, "w") as f:
            f.write(js)
    print("HARNESS_SUMMARY " + json.dumps(short), flush=True)
    print("HARNESS_RESULT " + js, flush=True)


if __name__ == "__main__":
    sys.exit(main())
