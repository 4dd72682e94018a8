"""Pretrain the toy text-to-image model on the toy world, deterministically from a seed.

    python -m toyworld.pretrain --out models/toyworld-sd --seed 0

Phases (all budgets are step counts, so the same seed gives the same weights whatever the machine
load; the torch thread count is fixed too):
1. VAE (AutoencoderKL): reconstruction of freshly rendered images (world scenes and
   world.random_codec_image), L2 + L1 + edge L1 + a small KL term; then a check that the metrics
   read reconstructions as they read the originals.
2. Encode a fixed set of rendered scenes to latents (posterior mean and std); the scaling factor
   is 1 / std of the latents, as SD's 0.18215 was chosen.
3. UNet2DConditionModel + CLIPTextModel jointly: epsilon prediction, 1000-step linear schedule,
   min-SNR-5 loss weights, captions re-drawn each time a scene is used (phrasing variety, omitted
   attributes) and dropped to "" with probability --caption_dropout (classifier-free guidance).
   An exponential moving average of the weights is what gets saved.
4. Save a StableDiffusionPipeline folder (safetensors) and train_log.txt.

`--minutes` is a cap on the whole run's wall clock: if the UNet phase would run past it, training
stops early and the log names the step; `--stop_at_step` with that step stops there on purpose,
so every run is reproducible from its command (the step count, not the clock, decides).
"""

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List

import numpy as np

# OpenMP's wait policy changes speed, never results: on an idle machine the default (spinning
# waiters) is ~1.5x faster than OMP_WAIT_POLICY=PASSIVE; on a busy one, PASSIVE is many times faster.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse_args(argv=None):
    from . import model as M

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (a StableDiffusionPipeline folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (fixed for reproducibility)")
    p.add_argument("--minutes", type=float, default=None, help="safety cap on the whole run's wall clock (see module doc)")
    p.add_argument("--stop_at_step", type=int, default=None,
                   help="end the UNet phase after this step of the --steps schedule (reproduces a run the --minutes cap stopped)")
    # VAE
    p.add_argument("--vae_steps", type=int, default=3000)
    p.add_argument("--vae_batch", type=int, default=8)
    p.add_argument("--vae_lr", type=float, default=2e-3)
    p.add_argument("--vae_edge", type=float, default=0.25, help="weight of the edge (image difference) L1 term")
    p.add_argument("--vae_kl", type=float, default=2e-5, help="weight of the mean per-element KL term")
    p.add_argument("--vae_codec_share", type=float, default=0.5, help="share of VAE batches drawn by world.random_codec_image")
    p.add_argument("--vae_from", default=None, help="reuse the VAE of this pipeline folder (skips phase 1; for experiments)")
    p.add_argument("--vae_crop", type=int, default=64, help="train the VAE on random crops of this size (64 = whole images)")
    p.add_argument("--vae_logvar_init", type=float, default=-6.0, help="initial bias of the posterior log-variance")
    p.add_argument("--vae_channels", type=int, nargs="+", default=list(M.DEFAULTS["vae_channels"]))
    p.add_argument("--vae_groups", type=int, default=M.DEFAULTS["vae_groups"])
    # data
    p.add_argument("--n_scenes", type=int, default=12000, help="scenes encoded once for the UNet phase")
    p.add_argument("--p_two", type=float, default=0.2, help="fraction of two-object scenes")
    # UNet + text encoder
    p.add_argument("--steps", type=int, default=3800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--min_lr_ratio", type=float, default=0.05)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--min_snr_gamma", type=float, default=5.0, help="0 = plain MSE")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--freeze_text_encoder", action="store_true")
    p.add_argument("--unet_channels", type=int, nargs="+", default=list(M.DEFAULTS["unet_channels"]))
    p.add_argument("--unet_attention", type=int, nargs="+", default=[int(a) for a in M.DEFAULTS["unet_attention"]])
    p.add_argument("--unet_heads", type=int, default=M.DEFAULTS["unet_heads"])
    p.add_argument("--unet_groups", type=int, default=M.DEFAULTS["unet_groups"])
    p.add_argument("--unet_layers", type=int, default=M.DEFAULTS["unet_layers"])
    p.add_argument("--te_hidden", type=int, default=M.DEFAULTS["te_hidden"])
    p.add_argument("--te_layers", type=int, default=M.DEFAULTS["te_layers"])
    p.add_argument("--save_dtype", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--eval_every", type=int, default=1500, help="during the UNet phase, sample and measure --eval_n prompts every this many steps (0 = never)")
    p.add_argument("--eval_n", type=int, default=40)
    p.add_argument("--eval_prompts", type=int, default=0, help="after saving, run toyworld.evaluate with this many prompts (0 = skip)")
    return p.parse_args(argv)


class Log:
    def __init__(self, path: str):
        self.f = open(path, "w", encoding="utf-8")
        self.t0 = time.perf_counter()

    def __call__(self, msg: str = "") -> None:
        # wall clock, and CPU seconds of this process (all threads): with 2 threads and no
        # contention the wall clock is about half the CPU time
        line = f"[{time.perf_counter() - self.t0:7.0f}s wall {time.process_time():7.0f}s cpu] {msg}" if msg else ""
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


def versions() -> Dict[str, str]:
    import diffusers
    import PIL
    import torch
    import transformers

    return {
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "numpy": np.__version__, "PIL": PIL.__version__,
        "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
    }


def _to_tensor(images: List[np.ndarray]):
    import torch

    a = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def _edge_loss(a, b):
    """L1 between the images' horizontal and vertical differences: MSE alone blurs edges."""
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def train_vae(args, cfg, log):
    import torch
    import torch.nn.functional as F

    from . import model as M
    from .world import random_codec_image, random_scene, render

    torch.manual_seed(args.seed)
    vae = M.build_vae(cfg)
    # start with a narrow posterior: with log-variance 0 the sampled latents are mostly noise and
    # the decoder learns nothing until the encoder has grown its means above it
    latent = int(cfg["latent_channels"])
    with torch.no_grad():
        vae.quant_conv.bias[latent:].fill_(args.vae_logvar_init)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng = np.random.default_rng([args.seed, 1])
    gen = torch.Generator().manual_seed(args.seed * 1000 + 1)
    n_params = sum(p.numel() for p in vae.parameters())
    log(f"VAE: {n_params / 1e6:.3f} M parameters, {args.vae_steps} steps of batch {args.vae_batch}, crops {args.vae_crop}px")
    t_start = time.perf_counter()
    acc = {"rec": 0.0, "kl": 0.0, "n": 0}
    c = args.vae_crop
    for step in range(1, args.vae_steps + 1):
        lr = args.vae_lr * min(1.0, step / 100) * (0.5 * (1 + math.cos(math.pi * step / args.vae_steps)) * 0.95 + 0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        images = [random_codec_image(rng) if rng.random() < args.vae_codec_share else render(random_scene(rng, p_two=args.p_two))
                  for _ in range(args.vae_batch)]
        x = _to_tensor(images)
        if c < x.shape[-1]:
            offs = rng.integers(0, x.shape[-1] - c + 1, size=(args.vae_batch, 2))
            x = torch.stack([x[i, :, oy:oy + c, ox:ox + c] for i, (oy, ox) in enumerate(offs)])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + args.vae_edge * _edge_loss(rec, x)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = rec_loss + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        acc["rec"] += rec_loss.item()
        acc["kl"] += kl.item()
        acc["n"] += 1
        if step % args.log_every == 0 or step == args.vae_steps:
            el = time.perf_counter() - t_start
            log(f"vae step {step}/{args.vae_steps} rec {acc['rec'] / acc['n']:.5f} kl {acc['kl'] / acc['n']:.3f} lr {lr:.2e} "
                f"({el / step:.3f} s/step, {el:.0f}s)")
            acc = {"rec": 0.0, "kl": 0.0, "n": 0}
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    t_vae = time.perf_counter() - t_start
    check_vae(vae, args.seed, log)
    return vae, t_vae


def check_vae(vae, seed, log, n=150):
    """Reconstruct rendered scenes (world scenes and sks scenes) and read them back with the
    metrics: the codec must not lose what the evaluation measures."""
    import torch

    from . import metrics
    from .world import random_scene, render

    rng = np.random.default_rng([seed, 4])
    results = {}
    for kind, sks in (("world", False), ("sks", True)):
        scenes = [random_scene(rng, sks=sks) for _ in range(n)]
        x = _to_tensor([render(s) for s in scenes])
        with torch.no_grad():
            rec = torch.cat([vae.decode(vae.encode(x[i:i + 50]).latent_dist.mean).sample for i in range(0, n, 50)])
        rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
        mae = float(np.abs(rec.astype(np.float32) - (x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).mean())
        ok = {}
        fid = []
        for s, im in zip(scenes, rec):
            m = metrics.measure(im)
            for k, v in metrics.compare(s, m).items():
                if v is not None:
                    ok.setdefault(k, []).append(v)
            if sks:
                fid.append(max([o.sks["score"] for o in m.objects] or [0.0]))
        results[kind] = {k: float(np.mean(v)) for k, v in ok.items()}
        extra = f", sks fidelity of reconstructions {np.mean(fid):.3f}" if sks else ""
        log(f"VAE check ({kind} scenes): MAE {mae:.2f}/255, metrics on reconstructions "
            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in results[kind].items()) + extra)
    return results


def encode_scenes(args, vae, log):
    import torch

    from .world import random_scene, render

    rng = np.random.default_rng([args.seed, 2])
    t_start = time.perf_counter()
    scenes = [random_scene(rng, p_two=args.p_two) for _ in range(args.n_scenes)]
    means, stds = [], []
    errs = []
    with torch.no_grad():
        for i in range(0, len(scenes), 64):
            x = _to_tensor([render(s) for s in scenes[i:i + 64]])
            post = vae.encode(x).latent_dist
            means.append(post.mean)
            stds.append(post.std)
            if i < 256:
                errs.append(float((vae.decode(post.mean).sample.clamp(-1, 1) - x).abs().mean() * 127.5))
    means = torch.cat(means)
    stds = torch.cat(stds)
    scale = float(1.0 / means.std())
    log(f"encoded {len(scenes)} scenes in {time.perf_counter() - t_start:.0f}s; latents {tuple(means.shape[1:])}, "
        f"std {means.std():.4f} (scaling_factor {scale:.5f}), posterior std mean {stds.mean():.4f}, "
        f"reconstruction MAE {np.mean(errs):.2f}/255 on {min(256, len(scenes))} scenes")
    return scenes, means, stds, scale, time.perf_counter() - t_start


def make_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import StableDiffusionPipeline

    from . import model as M

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=M.build_scheduler("ddim"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def quick_eval(vae, text_encoder, tokenizer, unet, n, log, label):
    """Sample n evaluation prompts (DDIM 20 steps, guidance 5) and log the accuracies."""
    from . import evaluate

    pipe = make_pipeline(vae, text_encoder, tokenizer, unet)
    pipe.set_progress_bar_config(disable=True)
    scenes = evaluate.eval_scenes(n, 1234, 0.3)
    t0 = time.perf_counter()
    images = evaluate.sample(pipe, [evaluate.world.caption(s) for s in scenes], 20, 5.0, 1234)
    r = evaluate.score(scenes, images)["all"]
    log(f"eval {label}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in r.items() if k != "n") + f" ({n} prompts, {time.perf_counter() - t0:.0f}s)")
    return r


def train_unet(args, cfg, tokenizer, scenes, means, stds, scale, log, t_run0, vae=None):
    import torch
    import torch.nn.functional as F

    from . import model as M
    from .world import caption

    torch.manual_seed(args.seed + 17)
    unet = M.build_unet(cfg)
    text_encoder = M.build_text_encoder(cfg, tokenizer)
    unet.train()
    text_encoder.train(not args.freeze_text_encoder)
    params = list(unet.parameters())
    if args.freeze_text_encoder:
        text_encoder.requires_grad_(False)
    else:
        params += list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = M.build_scheduler("ddpm")
    alphas_cumprod = sched.alphas_cumprod.float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_te = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    log(f"UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.3f} M parameters; text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.3f} M ({'frozen' if args.freeze_text_encoder else 'trained'}); "
        f"{args.steps} steps of batch {args.batch}")

    rng = np.random.default_rng([args.seed, 3])
    gen = torch.Generator().manual_seed(args.seed * 1000 + 3)
    n = len(scenes)
    order = rng.permutation(n)
    pos = 0
    t_start = time.perf_counter()
    acc = {"loss": 0.0, "n": 0}
    stopped_early = None
    losses = []
    for step in range(1, args.steps + 1):
        if args.stop_at_step is not None and step > args.stop_at_step:
            stopped_early = step - 1
            log(f"stopped at step {stopped_early} of the {args.steps}-step schedule (--stop_at_step)")
            break
        if args.minutes is not None and (time.perf_counter() - t_run0) > args.minutes * 60 - 90:
            stopped_early = step - 1
            log(f"STOPPED EARLY at step {stopped_early}: the --minutes {args.minutes} cap was reached")
            break
        if step <= args.warmup:
            lr = args.lr * step / args.warmup
        else:
            prog = (step - args.warmup) / max(1, args.steps - args.warmup)
            lr = args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))
        for g in opt.param_groups:
            g["lr"] = lr
        if pos + args.batch > n:
            order = rng.permutation(n)
            pos = 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        captions = [caption(scenes[i], rng) if rng.random() >= args.caption_dropout else "" for i in idx]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        idx_t = torch.from_numpy(idx)
        lat = means[idx_t] + stds[idx_t] * torch.randn(means[idx_t].shape, generator=gen)
        lat = lat * scale
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        noisy = sched.add_noise(lat, noise, t)
        hidden = text_encoder(ids)[0]
        pred = unet(noisy, t, hidden).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if args.min_snr_gamma > 0:
            w = torch.clamp(snr[t], max=args.min_snr_gamma) / snr[t]
            loss = (per * w).mean()
        else:
            loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_unet.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
            if not args.freeze_text_encoder:
                for e, p in zip(ema_te.parameters(), text_encoder.parameters()):
                    e.lerp_(p, 1 - decay)
        acc["loss"] += per.detach().mean().item()
        acc["n"] += 1
        if step % args.log_every == 0 or step == args.steps:
            el = time.perf_counter() - t_start
            mean_loss = acc["loss"] / acc["n"]
            losses.append((step, mean_loss))
            log(f"unet step {step}/{args.steps} mse {mean_loss:.5f} lr {lr:.2e} ({el / step:.3f} s/step, {el:.0f}s)")
            acc = {"loss": 0.0, "n": 0}
        if args.eval_every and vae is not None and step % args.eval_every == 0:
            t_eval = time.perf_counter()
            quick_eval(vae, ema_te, tokenizer, ema_unet, args.eval_n, log, f"at step {step} (EMA weights)")
            t_start += time.perf_counter() - t_eval  # evaluation time is not training time
    return ema_unet, ema_te, time.perf_counter() - t_start, stopped_early


def save_pipeline(out, vae, text_encoder, tokenizer, unet, save_dtype):
    import torch

    pipe = make_pipeline(vae, text_encoder, tokenizer, unet)
    if save_dtype == "fp16":
        # the UNet and the VAE are stored in fp16 (diffusers loads them as fp32 unless told
        # otherwise); the text encoder stays fp32, because transformers 5 would load fp16 weights
        # as an fp16 model by default
        unet.to(torch.float16)
        vae.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    unet.to(torch.float32)
    vae.to(torch.float32)


def folder_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from . import model as M

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "train_log.txt"))
    t_run0 = time.perf_counter()
    cfg = dict(M.DEFAULTS)
    cfg.update(
        vae_channels=tuple(args.vae_channels), vae_groups=args.vae_groups, unet_channels=tuple(args.unet_channels),
        unet_attention=tuple(bool(a) for a in args.unet_attention), unet_heads=args.unet_heads, unet_groups=args.unet_groups,
        unet_layers=args.unet_layers, te_hidden=args.te_hidden, te_layers=args.te_layers,
    )
    log("toyworld pretraining")
    log("command: python -m toyworld.pretrain " + " ".join(sys.argv[1:] if argv is None else argv))
    log("arguments: " + json.dumps(vars(args), sort_keys=True))
    log("model config: " + json.dumps(cfg, sort_keys=True))
    log("versions: " + json.dumps(versions(), sort_keys=True))
    log(f"torch threads {torch.get_num_threads()}; machine load average at start {os.getloadavg()}")
    tokenizer = M.build_tokenizer()
    log(f"tokenizer: {len(tokenizer)} tokens (256 bytes, 256 word-final bytes, whole words of the world + 'sks', merges)")

    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", torch_dtype=torch.float32).eval().requires_grad_(False)
        log(f"VAE reused from {args.vae_from} (experiment)")
        check_vae(vae, args.seed, log)
        t_vae = 0.0
    else:
        vae, t_vae = train_vae(args, cfg, log)
    scenes, means, stds, scale, t_enc = encode_scenes(args, vae, log)
    vae.register_to_config(scaling_factor=scale)
    unet, text_encoder, t_unet, stopped = train_unet(args, cfg, tokenizer, scenes, means, stds, scale, log, t_run0, vae=vae)
    text_encoder.eval()
    save_pipeline(args.out, vae, text_encoder, tokenizer, unet, args.save_dtype)
    total = time.perf_counter() - t_run0
    log(f"timings: vae {t_vae:.0f}s, encode {t_enc:.0f}s, unet+text encoder {t_unet:.0f}s, total {total:.0f}s "
        f"({total / 60:.1f} min); load average at end {os.getloadavg()}")
    log(f"saved to {args.out}: {folder_size(args.out) / 1e6:.2f} MB ({args.save_dtype} weights)")
    if stopped is not None and args.stop_at_step is None:
        log(f"NOTE: the --minutes cap stopped the UNet phase at step {stopped} of {args.steps}; the same command with "
            f"--stop_at_step {stopped} (and no cap) reproduces these weights exactly")
    log.f.close()
    if args.eval_prompts:
        from . import evaluate

        evaluate.main([args.out, "--n", str(args.eval_prompts)])


if __name__ == "__main__":
    main()
