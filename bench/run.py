"""Speed and memory of networks.tlora, measured on the real SD 1.5 / SDXL architectures with
random weights (no downloads), every algo against algo=lora (sd-scripts' LoRA math) in the same
process and run.

    python bench/run.py                                  # every part, default sizes
    python bench/run.py --parts creation --families sdxl
    python bench/run.py --parts step,memory --sizes 32x2,64x1 --steps 6
    python bench/run.py --parts sampling,convert

Parts:
  creation  create_network() time, rank 64, default targets (U-Net transformer blocks + text
            encoders), SD 1.5 and SDXL. Creation never reads the frozen weights (random init),
            so by default the models are built on the meta device (no 14 GB of SDXL weights);
            --real-weights builds them in RAM instead.
  step      training step (U-Net forward + backward + AdamW step over the network), SD 1.5
            U-Net, latent HxW x batch from --sizes, per-sample timesteps; median of --steps
            timed steps per algo after warm-up, algos interleaved round by round so that the
            machine's load drifts into every algo alike. PEFT LoRA at the same rank and targets
            when `peft` is installed.
  memory    peak resident memory of the same training step, one fresh subprocess per algo
            (see bench/measure.py for why and how).
  sampling  denoising U-Net forward (no grad, batch 2 as classifier-free guidance, scalar t per
            step) with algo=tlora applied and its timestep mask active, against the same network
            merged into the weights (pre_calculation), and the bare U-Net.
  convert   converters.convert_file of an SDXL-size rank-64 tlora file to kohya (exact rank and
            --rank 32), when the converters package is present.

Writes bench/results.md (tables, ratios to algo=lora, targets, machine, library versions, the
command), bench/results.json and bench/results.png.
"""

import argparse
import contextlib
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

import arch  # noqa: E402
import measure  # noqa: E402

ALGOS = ("lora", "tlora", "tlora_vanilla", "ortho", "trilora")
BASELINE = "lora"
# issue 5 / issue 2 targets, as ratios to algo=lora in the same run
STEP_TARGETS = {"tlora_vanilla": 1.05, "trilora": 1.05, "tlora": 1.15, "ortho": 1.15}
MEMORY_TARGET = 1.05
CREATION_TARGET_SDXL = 2.0
SAMPLING_TARGET = 1.10


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def network_kwargs(algo, rank):
    return {"algo": algo, "min_rank": str(rank // 2)}


def create(algo, rank, text_encoders, unet):
    import networks.tlora as tlora

    return tlora.create_network(1.0, rank, rank, None, text_encoders, unet, **network_kwargs(algo, rank))


# ----------------------------------------------------------------------------- creation


def build_models(family, real_weights):
    if real_weights:
        return arch.models(family)
    with torch.device("meta"):
        return arch.models(family)


def part_creation(args):
    results = {}
    for family in args.families:
        log(f"[creation] building {family} models ({'real weights' if args.real_weights else 'meta device'})")
        text_encoders, unet = build_models(family, args.real_weights)
        # warm-up: the first creation in a process pays the allocator's first touches
        del_net = create(BASELINE, args.rank, text_encoders, unet)
        info = {"unet_layers": len(del_net.unet_loras), "te_layers": len(del_net.text_encoder_loras)}
        del del_net
        gc.collect()
        times = {algo: [] for algo in args.algos}
        params = {}
        for round_index in range(args.creation_rounds):
            for algo in args.algos:
                gc.collect()
                start = measure.now()
                net = create(algo, args.rank, text_encoders, unet)
                times[algo].append(measure.now() - start)
                params[algo] = sum(p.numel() for p in net.parameters())
                del net
            log(f"[creation] {family} round {round_index + 1}: " + ", ".join(f"{a} {times[a][-1]:.2f}s" for a in args.algos))
        base = measure.median(times[BASELINE])
        results[family] = {
            "layers": info,
            "algos": {
                algo: {"seconds": measure.median(t), "all": t, "ratio": measure.median(t) / base, "trainable_params": params[algo]}
                for algo, t in times.items()
            },
        }
        del text_encoders, unet
        gc.collect()
    return results


# ----------------------------------------------------------------------------- training step


def parse_size(text):
    latent, _, batch = text.lower().partition("x")
    return int(latent), int(batch or 1)


def peft_target_names(unet, rank):
    """The U-Net module paths networks.tlora adapts (default targets), for PEFT's target_modules."""
    net = create(BASELINE, rank, [], unet)
    ids = {id(layer.org_module) for layer in net.unet_loras}
    del net
    return [name for name, module in unet.named_modules() if id(module) in ids]


class PeftVariant:
    """PEFT LoRA injected into the same U-Net; enabled only while it is measured."""

    def __init__(self, unet, rank):
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        targets = peft_target_names(unet, rank)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, init_lora_weights=True)
        inject_adapter_in_model(config, unet, adapter_name="bench")
        self.layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self.params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in self.params:
            p.requires_grad_(True)
        self.count = len(targets)
        self.enable(False)

    def enable(self, on):
        for layer in self.layers:
            layer.enable_adapters(on)


def make_step(unet, family, params, batch, latent, seed=0):
    (latents, timesteps, context), kwargs = arch.unet_inputs(family, batch, latent, seed)
    target = torch.randn_like(latents)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4)

    def step():
        out = unet(latents, timesteps, context, **kwargs).sample
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def prepare_variant(name, unet, rank):
    """(enable, disable, params) for one variant on the shared U-Net."""
    if name == "peft":
        peft = PeftVariant(unet, rank)
        return (lambda: peft.enable(True)), (lambda: peft.enable(False)), peft.params, {"layers": peft.count}
    net = create(name, rank, [], unet)
    net.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    net.remove()
    groups, _ = net.prepare_optimizer_params_with_multiple_te_lrs(None, 1e-4, 1e-4)
    params = [p for g in groups for p in g["params"]]
    net.train()

    def enable():
        net.apply_to([], unet, apply_text_encoder=False, apply_unet=True)

    return enable, net.remove, params, {"layers": len(net.unet_loras), "network": net}


def variants(args):
    names = list(args.algos)
    if args.peft and peft_available():
        names.append("peft")
    return names


def peft_available():
    try:
        import peft  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False


def part_step(args):
    log("[step] building SD 1.5 U-Net (random weights)")
    unet = arch.unet("sd15")
    results = {}
    names = variants(args)
    prepared = {}
    for name in names:
        start = measure.now()
        prepared[name] = prepare_variant(name, unet, args.rank)
        log(f"[step] {name}: network ready in {measure.now() - start:.1f}s")
    for size in args.sizes:
        latent, batch = parse_size(size)
        steps = {name: make_step(unet, "sd15", prepared[name][2], batch, latent) for name in names}
        times = {name: [] for name in names}
        losses = {}
        for round_index in range(args.rounds):
            for name in names:
                enable, disable, _, _ = prepared[name]
                enable()
                try:
                    for _ in range(args.warmup):
                        steps[name]()
                    for _ in range(args.steps):
                        start = measure.now()
                        losses[name] = steps[name]()
                        times[name].append(measure.now() - start)
                        log(f"[step]   {size} {name}: {times[name][-1]:.2f}s loss {losses[name]:.4f}")
                finally:
                    disable()
            log(f"[step] {size} round {round_index + 1}: " + ", ".join(f"{n} {measure.median(times[n][-args.steps:]):.2f}s" for n in names))
        base = measure.median(times[BASELINE])
        base_min = min(times[BASELINE])
        results[size] = {
            name: {
                "seconds": measure.median(t), "min": min(t), "all": t, "ratio": measure.median(t) / base,
                "ratio_min": min(t) / base_min, "last_loss": losses[name],
            }
            for name, t in times.items()
        }
    return results


# ----------------------------------------------------------------------------- memory (subprocess per variant)


def memory_worker(args):
    """Runs in a fresh process: the peak RSS of training steps of one variant."""
    latent, batch = parse_size(args.sizes[0])
    unet = arch.unet("sd15")
    gc.collect()
    model_rss = measure.rss_bytes()
    reset_ok = measure.reset_peak_rss()
    enable, _, params, _ = prepare_variant(args.worker_variant, unet, args.rank)
    enable()
    step = make_step(unet, "sd15", params, batch, latent)
    for _ in range(args.warmup + args.memory_steps):
        step()
    result = {
        "model_rss": model_rss,
        "peak_rss": measure.peak_rss_bytes(),
        "hwm_reset": reset_ok,
        "trainable_params": sum(p.numel() for p in params),
    }
    print("RESULT " + json.dumps(result), flush=True)


def part_memory(args):
    results = {}
    names = variants(args)
    for name in names:
        cmd = [
            sys.executable, os.path.abspath(__file__), "--worker", "memory", "--worker-variant", name,
            "--rank", str(args.rank), "--sizes", args.sizes[0], "--warmup", str(args.warmup),
            "--memory-steps", str(args.memory_steps), "--threads", str(torch.get_num_threads()),
        ]
        log(f"[memory] {name}: subprocess")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"memory worker {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT "):])
        r = results[name]
        log(f"[memory] {name}: peak {r['peak_rss'] / 2**20:.0f} MiB, model {r['model_rss'] / 2**20:.0f} MiB")
    base = results[BASELINE]
    for name, r in results.items():
        r["ratio"] = r["peak_rss"] / base["peak_rss"]
        r["increment"] = r["peak_rss"] - r["model_rss"]
        r["increment_ratio"] = r["increment"] / max(1, base["peak_rss"] - base["model_rss"])
    return {"size": args.sizes[0], "variants": results}


# ----------------------------------------------------------------------------- sampling


def part_sampling(args):
    log("[sampling] building SD 1.5 U-Net (random weights)")
    unet = arch.unet("sd15")
    latent, _ = parse_size(args.sizes[0])
    batch = 2  # classifier-free guidance: [uncond; cond]
    (latents, _, context), kwargs = arch.unet_inputs("sd15", batch, latent, seed=1)
    schedule = torch.linspace(999, 0, args.sampling_steps).round().long().tolist()
    results = {}

    def randomise(net):
        # a trained-looking network: nonzero change, so merged and unmerged outputs can be compared
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in net.unet_loras:
                up = layer.factor("up")
                up.copy_(torch.randn(up.shape, generator=g) * 0.01)

    @torch.no_grad()
    def denoise():
        out = None
        for t in schedule:
            out = unet(latents, t, context, **kwargs).sample
        return out

    def timed():
        denoise()  # warm-up
        times = []
        for _ in range(args.sampling_rounds):
            start = measure.now()
            denoise()
            times.append((measure.now() - start) / len(schedule))
        return times

    variants_timed = {}
    for algo in args.sampling_algos:
        net = create(algo, args.rank, [], unet)
        randomise(net)
        net.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
        net.eval()
        variants_timed[f"{algo} (timestep-aware)" if arch_masked(algo) else f"{algo} (unmerged)"] = timed()
        net.backup_weights()
        net.pre_calculation()  # merged: all ranks, layers disabled
        variants_timed[f"{algo} merged"] = timed()
        net.restore_weights()
        net.remove()
        del net
    variants_timed["bare U-Net"] = timed()
    merged_key = f"{args.sampling_algos[0]} merged"
    base = measure.median(variants_timed[merged_key])
    for name, t in variants_timed.items():
        results[name] = {"seconds_per_step": measure.median(t), "all": t, "ratio": measure.median(t) / base}
    return {"latent": latent, "batch": batch, "steps": len(schedule), "baseline": merged_key, "variants": results}


def arch_masked(algo):
    from networks.tlora_format import ALGOS as SPECS

    return SPECS[algo].masked


# ----------------------------------------------------------------------------- conversion


def part_convert(args):
    try:
        from converters import convert_file
    except Exception as e:  # noqa: BLE001 - not built yet, or broken: report, do not fail the bench
        return {"skipped": f"converters package not importable ({type(e).__name__}: {e})"}
    from networks.tlora_format import NetworkConfig, atomic_save_safetensors, build_metadata

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        log("[convert] writing an SDXL-size rank-64 tlora file (fp16, every SDXL target layer)")
        text_encoders, unet = build_models("sdxl", False)
        # the layer list and shapes of algo=tlora on SDXL, from a network that is quick to create;
        # factors drawn directly (conversion cost does not depend on their values): random P, Q,
        # a trained copy that moved away from the frozen one
        layout = create("trilora", args.rank, text_encoders, unet)
        rank = args.rank
        config = NetworkConfig(algo="tlora", rank=rank, alpha=float(rank), min_rank=rank // 2)
        g = torch.Generator().manual_seed(0)
        tensors = {}
        for layer in layout.loras:
            down_shape = tuple(layer.factor("down").shape)
            up_shape = tuple(layer.factor("up").shape)
            q0 = torch.randn(down_shape, generator=g) / down_shape[1] ** 0.5
            p0 = torch.randn(up_shape, generator=g) / rank ** 0.5
            lam0 = torch.rand(rank, generator=g) * 0.01
            n = layer.lora_name
            tensors[f"{n}.svd_down_base.weight"] = q0
            tensors[f"{n}.svd_up_base.weight"] = p0
            tensors[f"{n}.svd_lambda_base"] = lam0
            tensors[f"{n}.svd_down.weight"] = q0 + torch.randn(down_shape, generator=g) * 1e-3
            tensors[f"{n}.svd_up.weight"] = p0 + torch.randn(up_shape, generator=g) * 1e-3
            tensors[f"{n}.svd_lambda"] = lam0 * 1.5
            tensors[f"{n}.alpha"] = torch.tensor(float(rank))
        tensors = {k: v.to(torch.float16) for k, v in tensors.items()}
        source = os.path.join(tmp, "sdxl_tlora_r64.safetensors")
        atomic_save_safetensors(tensors, source, build_metadata(config, {"ss_base_model_version": "sdxl_base_v1-0"}))
        results["source_mb"] = os.path.getsize(source) / 2**20
        results["layers"] = len(layout.loras)
        del layout, text_encoders, unet, tensors
        gc.collect()
        for label, kwargs in (("exact (rank 2R, mask=full)", {}), ("--rank 32", {"rank": 32})):
            out = os.path.join(tmp, "out.safetensors")
            times = []
            report = None
            for _ in range(args.convert_rounds):
                if os.path.exists(out):
                    os.unlink(out)
                start = measure.now()
                report = convert_file(source, out, target="kohya", **kwargs)
                times.append(measure.now() - start)
            results[label] = {
                "seconds": measure.median(times),
                "all": times,
                "out_mb": os.path.getsize(out) / 2**20,
                "max_rel_error": getattr(report, "max_rel_error", None),
            }
            log(f"[convert] {label}: {results[label]['seconds']:.1f}s")
    return results


# ----------------------------------------------------------------------------- report


def fmt_ratio(value, target=None):
    text = f"{value:.2f}x"
    if target is not None:
        text += " ✅" if value <= target else " ❌"
    return text


def write_report(args, data, command):
    lines = ["# networks.tlora benchmark", ""]
    lines += [
        "Generated by `bench/run.py`; every ratio is against `algo=lora` (sd-scripts' LoRA math) "
        "measured in the same process and run. ✅/❌ = issue 5 / issue 2 target met or missed.",
        "",
        f"Command: `{command}`",
        "",
    ]
    if "creation" in data:
        lines += ["## Network creation (rank 64, default targets, U-Net + text encoders)", ""]
        lines += ["| model | algo | layers (U-Net + TE) | seconds (median) | ratio to lora | target |", "|---|---|---|---|---|---|"]
        for family, r in data["creation"].items():
            layers = f"{r['layers']['unet_layers']} + {r['layers']['te_layers']}"
            for algo, a in r["algos"].items():
                target = CREATION_TARGET_SDXL if family == "sdxl" else None
                lines.append(
                    f"| {family} | {algo} | {layers} | {a['seconds']:.2f} | {fmt_ratio(a['ratio'], target if algo != BASELINE else None)} | "
                    f"{'≤ 2x' if target and algo != BASELINE else ''} |"
                )
        lines.append("")
    if "step" in data:
        lines += ["## Training step, SD 1.5 U-Net (forward + backward + AdamW), rank 64", ""]
        lines += [
            "| latent x batch | variant | seconds (median) | ratio to lora (median) | seconds (min) | ratio (min) | target |",
            "|---|---|---|---|---|---|---|",
        ]
        for size, r in data["step"].items():
            base_min = min(r[BASELINE]["all"])
            for name, a in r.items():
                a.setdefault("min", min(a["all"]))
                a.setdefault("ratio_min", a["min"] / base_min)
                target = STEP_TARGETS.get(name)
                lines.append(
                    f"| {size} | {name} | {a['seconds']:.3f} | {fmt_ratio(a['ratio'], target)} | {a.get('min', float('nan')):.3f} | "
                    f"{a.get('ratio_min', float('nan')):.2f}x | {f'≤ {target:.2f}x' if target else ''} |"
                )
        lines.append("")
    if "memory" in data:
        m = data["memory"]
        lines += [f"## Peak memory of training steps, SD 1.5 U-Net, {m['size']}", ""]
        lines += [
            "Peak resident set (VmHWM) of a fresh process per variant, reset after the frozen U-Net is built; "
            "'above model' = peak minus the resident U-Net (network + optimiser state + activations).",
            "",
            "| variant | peak MiB | ratio to lora | above model MiB | ratio (above model) | target |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in m["variants"].items():
            lines.append(
                f"| {name} | {r['peak_rss'] / 2**20:.0f} | {fmt_ratio(r['ratio'], MEMORY_TARGET if name != BASELINE else None)} | "
                f"{r['increment'] / 2**20:.0f} | {r['increment_ratio']:.2f}x | {'≤ 1.05x' if name != BASELINE else ''} |"
            )
        lines.append("")
    if "sampling" in data:
        s = data["sampling"]
        lines += [
            f"## Sampling, SD 1.5 U-Net forward, latent {s['latent']}, batch {s['batch']} (CFG), {s['steps']} steps, no grad",
            "",
            f"Ratio to `{s['baseline']}` (the same network merged into the weights).",
            "",
            "| variant | seconds / step | ratio | target |",
            "|---|---|---|---|",
        ]
        for name, r in s["variants"].items():
            target = SAMPLING_TARGET if "timestep-aware" in name else None
            lines.append(f"| {name} | {r['seconds_per_step']:.3f} | {fmt_ratio(r['ratio'], target)} | {'≤ 1.10x' if target else ''} |")
        lines.append("")
    if "convert" in data:
        c = data["convert"]
        lines += ["## Conversion of an SDXL-size rank-64 tlora file to kohya", ""]
        if "skipped" in c:
            lines += [f"Skipped: {c['skipped']}", ""]
        else:
            lines += [f"Source: {c['layers']} layers, {c['source_mb']:.0f} MiB (fp16, native tlora format with frozen copies).", "", "| conversion | seconds | output MiB | max rel. error |", "|---|---|---|---|"]
            for label, r in c.items():
                if isinstance(r, dict):
                    err = r["max_rel_error"]
                    lines.append(f"| {label} | {r['seconds']:.1f} | {r['out_mb']:.0f} | {'' if err is None else f'{err:.2e}'} |")
            lines.append("")
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    lines += ["## Machine", ""]
    for key, value in data["machine"].items():
        lines.append(f"- {key}: {value}")
    lines.append(f"- load average at start / end (1, 5, 15 min): {data['load_start']} | {data['load_end']}")
    lines.append("")
    with open(args.out, "w") as f:
        f.write("\n".join(lines))


def write_chart(args, data):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        log(f"[chart] matplotlib unavailable ({e}); no chart")
        return False
    panels = []
    if "creation" in data:
        for family, r in data["creation"].items():
            panels.append((f"creation {family}", {a: v["ratio"] for a, v in r["algos"].items()}, CREATION_TARGET_SDXL if family == "sdxl" else None))
    if "step" in data:
        for size, r in data["step"].items():
            panels.append((f"train step {size}", {a: v["ratio"] for a, v in r.items()}, None))
    if "memory" in data:
        panels.append(("peak memory", {a: v["ratio"] for a, v in data["memory"]["variants"].items()}, MEMORY_TARGET))
    if "sampling" in data:
        panels.append(("sampling vs merged", {a: v["ratio"] for a, v in data["sampling"]["variants"].items()}, SAMPLING_TARGET))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, ratios, target) in zip(axes[0], panels):
        names = list(ratios)
        ax.bar(range(len(names)), [ratios[n] for n in names], color=["#888" if n in (BASELINE, "bare U-Net") else "#3a7" for n in names])
        ax.axhline(1.0, color="k", lw=0.8)
        if target:
            ax.axhline(target, color="r", lw=0.8, ls="--", label=f"target {target}x")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("ratio")
    fig.suptitle("networks.tlora: ratio to the baseline (lower is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.chart, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="creation,step,memory,sampling,convert", help="comma list of: creation, step, memory, sampling, convert")
    p.add_argument("--families", default="sd15,sdxl", help="creation: sd15, sdxl")
    p.add_argument("--algos", default=",".join(ALGOS))
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--sizes", default="32x2", help="step/memory/sampling: comma list of LATENTxBATCH (latent side in pixels/8)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per algo per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the algos")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps each time an algo is switched in")
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--creation-rounds", type=int, default=3)
    p.add_argument("--real-weights", action="store_true", help="creation: build models in RAM instead of on the meta device")
    p.add_argument("--no-peft", dest="peft", action="store_false")
    p.add_argument("--sampling-steps", type=int, default=4)
    p.add_argument("--sampling-rounds", type=int, default=3)
    p.add_argument("--sampling-algos", default="tlora,lora")
    p.add_argument("--convert-rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--out", default=os.path.join(HERE, "results.md"))
    p.add_argument("--json", default=os.path.join(HERE, "results.json"))
    p.add_argument("--chart", default=os.path.join(HERE, "results.png"))
    p.add_argument("--merge", help="comma list of results.json files of separate runs: write one report of all their parts")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    args.families = [x.strip() for x in args.families.split(",") if x.strip()]
    args.algos = [x.strip() for x in args.algos.split(",") if x.strip()]
    if BASELINE not in args.algos:
        args.algos.insert(0, BASELINE)
    args.sizes = [x.strip() for x in args.sizes.split(",") if x.strip()]
    args.sampling_algos = [x.strip() for x in args.sampling_algos.split(",") if x.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    logging_quiet()

    if args.worker == "memory":
        memory_worker(args)
        return 0
    if args.merge:
        return merge_reports(args)

    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    data = {"machine": measure.machine(), "load_start": measure.load_average(), "notes": [], "command": command}
    for part in args.parts:
        start = time.time()
        fn = {"creation": part_creation, "step": part_step, "memory": part_memory, "sampling": part_sampling, "convert": part_convert}.get(part)
        if fn is None:
            p.error(f"unknown part {part!r}")
        data[part] = fn(args)
        log(f"[{part}] done in {time.time() - start:.0f}s")
        gc.collect()
    data["load_end"] = measure.load_average()
    if "creation" in data and not args.real_weights:
        data["notes"].append("creation: models built on the meta device (creation reads no frozen weight with the default random init)")
    if "step" in data and "peft" not in data["step"].get(args.sizes[0], {}) and args.peft:
        data["notes"].append("PEFT is not installed: no PEFT row")
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1, default=str)
    write_report(args, data, command)
    if write_chart(args, data):
        log(f"wrote {args.out}, {args.json}, {args.chart}")
    return 0


def merge_reports(args):
    """One report from the JSON of several runs (parts run one at a time on a small machine)."""
    data = {"notes": [], "commands": []}
    for path in [x for x in args.merge.split(",") if x]:
        with open(path) as f:
            part = json.load(f)
        for key, value in part.items():
            if key == "notes":
                data["notes"] += [n for n in value if n not in data["notes"]]
            elif key == "command":
                data["commands"].append(value)
            elif key in ("load_start", "load_end"):
                data.setdefault(key + "s", []).append(value)
            elif key == "creation" and isinstance(data.get(key), dict):
                data[key].update(value)  # families from separate runs
            else:
                data[key] = value
    data["load_start"] = " | ".join(data.pop("load_starts", []))
    data["load_end"] = " | ".join(data.pop("load_ends", []))
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1, default=str)
    write_report(args, data, " ; ".join(data["commands"]))
    write_chart(args, data)
    log(f"wrote {args.out}, {args.json}, {args.chart}")
    return 0


def logging_quiet():
    import logging

    logging.getLogger("networks").setLevel(logging.WARNING)
    with contextlib.suppress(Exception):
        import diffusers

        diffusers.utils.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
