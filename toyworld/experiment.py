"""The papers' one-image experiment on the toy world: concept fidelity against context following.

    # docs/toyworld as published: 40 trainings, about 1 h 45 min on 2 cores
    python -m toyworld.experiment --out docs/toyworld --seeds 0 1 2 3 4 --sweep_seeds 0 1 2
    python -m toyworld.experiment --out /tmp/quick --seeds 0 --algos lora tlora --no_sweeps   # ~10 min

One image of the novel sks object (a pink/teal heart, large, centred, on gray; caption "a sks
shape") trains a rank-8 adapter (linear layers of the transformer blocks and the ResNet 3x3
convolutions, as the README's first run) of the toy model (models/toyworld-sd)
with each algorithm - LoRA, Ortho-LoRA, TriLoRA, T-LoRA vanilla and T-LoRA - at the same steps,
learning rate and optimizer, with train_tlora.py as a user runs it, for several seeds. Then
prompts that move the object into other contexts (other backgrounds, positions, a smaller size,
next to another object) are sampled with diffusers (the network attached by
converters.apply_tlora, timestep-aware) and read back exactly by toyworld.metrics:

- concept fidelity: toyworld.metrics sks fidelity of the best-matching object (1 = the rendered
  sks object; shape IoU and the two-colour pattern);
- context following: the share of the prompt's context the image has (the background colour,
  the object's position and size, the other object's shape and colour where one is asked for);
- copying: how often the image shows the training context (gray, centre, large) where the prompt
  asks for another - the memorisation T-LoRA is meant to reduce;
- diversity: mean pixel distance between the samples of one prompt (0..1).

The base model without an adapter and ground-truth renders of the prompts bound the plot. Then
min_rank and the schedule power of T-LoRA are swept. Everything is written under --out:
results.json, README.md (the results page), plots and sample grids; finished runs are kept in
runs/ and reused when the script is run again with the same settings.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tlora_trainer.fileio import atomic_write_text  # noqa: E402

from . import metrics, world  # noqa: E402

MODEL = os.path.join(ROOT, "models", "toyworld-sd")
ALGOS = ("lora", "ortho", "trilora", "tlora_vanilla", "tlora")
ALGO_TITLES = {"lora": "LoRA", "ortho": "Ortho-LoRA", "trilora": "TriLoRA", "tlora_vanilla": "T-LoRA vanilla", "tlora": "T-LoRA"}
MASKED = ("tlora", "tlora_vanilla")

# Contexts the training image never shows. Every prompt names the background; position and size
# are named where they change (the training image: large, center, gray).
PROMPTS = (
    "a large sks shape in the center, on a black background",
    "a large sks shape in the center, on a white background",
    "a large sks shape in the center, on a brown background",
    "a large sks shape in the center, on a navy background",
    "a large sks shape on the left, on a gray background",
    "a large sks shape on the right, on a gray background",
    "a large sks shape at the top, on a gray background",
    "a small sks shape in the center, on a gray background",
    "a small sks shape on the left, on a navy background",
    "a small sks shape at the bottom, on a white background",
    "a large sks shape on the left and a small blue square on the right, on a black background",
    "a small sks shape at the top and a large yellow circle at the bottom, on a navy background",
)
TRAINING_CONTEXT = {"background": "gray", "position": "center", "size": "large"}


@dataclass(frozen=True)
class Setting:
    """One training configuration (run for every seed)."""

    name: str
    algo: str
    min_rank: Optional[int] = None
    power: Optional[float] = None
    group: str = "algorithms"
    rank: int = 8

    def network_args(self) -> List[str]:
        # the transformer blocks' linear layers and the ResNet 3x3 convolutions (LoCon): the toy
        # U-Net has no attention at its finest level, where an object's outline and colours are drawn
        out = [f"algo={self.algo}", "targets=transformer", f"conv_dim={self.rank}"]
        if self.min_rank is not None:
            out.append(f"min_rank={self.min_rank}")
        if self.power is not None:
            out.append(f"rank_schedule_power={self.power}")
        return out


def settings(args) -> List[Setting]:
    out = [Setting(a, a, args.min_rank if a in MASKED else None, rank=args.rank) for a in args.algos]
    if not args.no_sweeps:
        out += [Setting(f"tlora-min_rank{m}", "tlora", m, group="min_rank", rank=args.rank) for m in args.sweep_min_rank if m != args.min_rank]
        out += [Setting(f"tlora-power{p:g}", "tlora", args.min_rank, p, group="power", rank=args.rank) for p in args.sweep_power if p != 1.0]
    return out


# ----------------------------------------------------------------------------------- scoring


def prompt_spec(prompt: str) -> Dict[str, object]:
    """What a prompt asks for: background and the objects (sks first), as world.parse_caption reads it."""
    spec = world.parse_caption(prompt)
    objects = sorted(spec["objects"], key=lambda o: o["shape"] != world.SKS)
    assert objects and objects[0]["shape"] == world.SKS, prompt
    return {"background": spec["background"], "sks": objects[0], "others": objects[1:]}


def score_image(spec: Dict[str, object], image: np.ndarray) -> Dict[str, float]:
    m = metrics.measure(image)
    sks_want = spec["sks"]
    candidates = [o for o in m.objects if sks_want["position"] is None or len(spec["others"]) == 0 or o.position == sks_want["position"]]
    sks_obj = max(candidates or m.objects, key=lambda o: o.sks["score"], default=None)
    checks = {"background": m.background == spec["background"]}
    if sks_want["position"]:
        checks["position"] = sks_obj is not None and sks_obj.position == sks_want["position"]
    if sks_want["size"]:
        checks["size"] = sks_obj is not None and sks_obj.size == sks_want["size"]
    for other in spec["others"]:
        got = m.object_at(other["position"])
        checks[f"other at {other['position']}"] = (got is not None and got is not sks_obj and got.shape == other["shape"]
                                                   and got.colour == other["colour"])
    copied = []
    if spec["background"] != TRAINING_CONTEXT["background"]:
        copied.append(m.background == TRAINING_CONTEXT["background"])
    if sks_want["position"] not in (None, TRAINING_CONTEXT["position"]):
        copied.append(sks_obj is not None and sks_obj.position == TRAINING_CONTEXT["position"])
    if sks_want["size"] not in (None, TRAINING_CONTEXT["size"]):
        copied.append(sks_obj is not None and sks_obj.size == TRAINING_CONTEXT["size"])
    return {
        "fidelity": float(sks_obj.sks["score"]) if sks_obj is not None else 0.0,
        "context": float(np.mean([float(v) for v in checks.values()])),
        "copied": float(np.mean(copied)) if copied else float("nan"),
        "background_ok": float(checks["background"]),
    }


def diversity(images: Sequence[np.ndarray]) -> float:
    """Mean RMS pixel distance (0..1) over pairs of samples of one prompt."""
    flat = [im.astype(np.float32).ravel() / 255.0 for im in images]
    d = [float(np.sqrt(np.mean((a - b) ** 2))) for i, a in enumerate(flat) for b in flat[i + 1:]]
    return float(np.mean(d)) if d else 0.0


def score_run(images: List[np.ndarray], samples_per_prompt: int) -> Dict[str, float]:
    per_image = []
    div = []
    for p, prompt in enumerate(PROMPTS):
        spec = prompt_spec(prompt)
        group = images[p * samples_per_prompt:(p + 1) * samples_per_prompt]
        per_image += [score_image(spec, im) for im in group]
        div.append(diversity(group))
    out = {k: float(np.nanmean([r[k] for r in per_image])) for k in per_image[0]}
    out["diversity"] = float(np.mean(div))
    return out


# ----------------------------------------------------------------------------------- running


def write_example(folder: str) -> str:
    """The training image and caption (what examples/sks_toyworld ships)."""
    os.makedirs(folder, exist_ok=True)
    world.render_pil(world.sks_example()).save(os.path.join(folder, "sks.png"))
    with open(os.path.join(folder, "sks.txt"), "w") as f:
        f.write(world.SKS_EXAMPLE_CAPTION + "\n")
    return folder


def run_file(run_dir: str, setting: Setting, seed: int) -> str:
    """Where one training's network lies (and is reused from when it exists)."""
    return os.path.join(run_dir, f"{setting.name}-s{seed}.safetensors")


def train(setting: Setting, seed: int, args, data: str, run_dir: str, threads: int) -> str:
    """Train one run with train_tlora.py in a child process (kept and reused when its file exists)."""
    name = f"{setting.name}-s{seed}"
    out_file = run_file(run_dir, setting, seed)
    if os.path.exists(out_file):
        return out_file
    t_run = time.perf_counter()
    cmd = [sys.executable, os.path.join(ROOT, "train_tlora.py"), "--pretrained_model_name_or_path", args.model,
           "--train_data_dir", data, "--caption_extension", ".txt", "--resolution", "64", "--output_dir", run_dir,
           "--output_name", name, "--network_module", "networks.tlora", "--network_dim", str(args.rank),
           "--network_alpha", str(args.rank), "--network_args", *setting.network_args(), "--network_train_unet_only",
           "--optimizer_type", "AdamW", "--optimizer_args", "weight_decay=1e-4", "--learning_rate", str(args.learning_rate),
           "--lr_scheduler", "constant", "--max_train_steps", str(args.steps), "--train_batch_size", "1",
           "--seed", str(seed), "--mixed_precision", "no"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"training {name} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    print(f"trained {name} ({time.perf_counter() - t_run:.0f}s, {threads} thread(s))", flush=True)
    return out_file


def train_all(runs: List[tuple], args, data: str, run_dir: str) -> Dict[tuple, str]:
    """Every (setting, seed) trained, `args.jobs` at a time.

    The toy model's training step is too small to keep two threads busy: two one-thread
    trainings side by side finish in about the time one two-thread training takes."""
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {key: pool.submit(train, key[0], key[1], args, data, run_dir, threads) for key in runs}
        return {key: f.result() for key, f in futures.items()}


def in_window(timestep: float, window: Optional[str], split: int) -> bool:
    """Whether the adapter runs at this denoising timestep: window None (every step), "high"
    (t >= split: the noisy steps that lay out the image) or "low" (t < split: the steps that
    refine it)."""
    if window is None:
        return True
    return timestep >= split if window == "high" else timestep < split


def sample_with(pipe, network_file: Optional[str], args, window: Optional[str] = None) -> List[np.ndarray]:
    """The prompts' samples with the network attached (timestep-aware), at the steps of `window` only."""
    import torch

    from converters.diffusers import apply_tlora, remove_tlora

    from .evaluate import sample

    prompts = [p for p in PROMPTS for _ in range(args.samples)]
    hook = None
    if network_file:
        network = apply_tlora(pipe, network_file)
        if window is not None:
            def switch(module, hook_args, kwargs):
                t = hook_args[1] if len(hook_args) > 1 else kwargs["timestep"]
                network.set_multiplier(1.0 if in_window(float(torch.as_tensor(t).reshape(-1)[0]), window, args.split_timestep) else 0.0)

            hook = pipe.unet.register_forward_pre_hook(switch, with_kwargs=True)
    try:
        return sample(pipe, prompts, args.sampling_steps, args.guidance, seed=args.sample_seed, batch=24)
    finally:
        if hook is not None:
            hook.remove()
        if network_file:
            remove_tlora(pipe)


def ground_truth(samples: int, seed: int) -> List[np.ndarray]:
    """Renders of the prompts, `samples` jittered draws each (an upper bound for every metric)."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for prompt in PROMPTS:
        spec = prompt_spec(prompt)
        for _ in range(samples):
            objs = []
            for o in [spec["sks"], *spec["others"]]:
                size = o["size"] or ("small", "large")[rng.integers(2)]
                base = world.Obj(world.SKS if o["shape"] == world.SKS else o["shape"], o["colour"], size, o["position"] or "center")
                objs.append(world.jittered(rng, base))
            out.append(world.render(world.Scene(spec["background"], tuple(objs))))
    return out


# ----------------------------------------------------------------------------------- report


def _mean_std(values: List[float]):
    a = np.array(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(per_run: Dict[str, Dict[str, Dict[str, float]]]) -> Dict[str, Dict[str, List[float]]]:
    out = {}
    for name, by_seed in per_run.items():
        keys = next(iter(by_seed.values())).keys()
        out[name] = {k: list(_mean_std([r[k] for r in by_seed.values()])) for k in keys}
        out[name]["seeds"] = len(by_seed)
    return out


def write_plots(out: str, agg, references, the_settings: List[Setting], args) -> List[str]:
    from .plot import PALETTE, Plot, Series, render, zoom

    written = []
    truth = references["renders"]
    main = Plot(f"Concept fidelity vs context following (mean ± std over seeds; ground-truth renders: {truth['context']:.2f}, "
                f"{truth['fidelity']:.2f}, off the plot)", "context following", "concept fidelity (sks)")
    for i, s in enumerate(x for x in the_settings if x.group == "algorithms"):
        a = agg[s.name]
        main.series.append(Series(ALGO_TITLES.get(s.algo, s.name), [(a["context"][0], a["fidelity"][0], a["context"][1], a["fidelity"][1])],
                                  PALETTE[i % len(PALETTE)]))
    # the renders (context 1, fidelity ~0.96) are in the table; on the plot they would squeeze the algorithms into a corner
    r = references["base"]
    main.series.append(Series("base model, no adapter", [(r["context"], r["fidelity"], 0, 0)], (90, 90, 90), marker="s"))
    zoom(main)
    render(main).save(os.path.join(out, "fidelity_vs_context.png"))
    written.append("fidelity_vs_context.png")

    for group, label, fmt in (("min_rank", "min_rank", "r_min={}"), ("power", "schedule power", "p={}")):
        members = [s for s in the_settings if s.group == group]
        if not members:
            continue
        base = next((s for s in the_settings if s.group == "algorithms" and s.algo == "tlora"), None)
        if base is not None:
            members.append(base)
        key = (lambda s: s.min_rank) if group == "min_rank" else (lambda s: s.power if s.power is not None else 1.0)
        members.sort(key=key)
        plot = Plot(f"T-LoRA, {label} sweep (rank {args.rank})", "context following", "concept fidelity (sks)")
        plot.series.append(Series(f"T-LoRA by {label}", [(agg[s.name]["context"][0], agg[s.name]["fidelity"][0], agg[s.name]["context"][1],
                                                          agg[s.name]["fidelity"][1]) for s in members], PALETTE[3], line=True,
                                  point_labels=[fmt.format(key(s)) for s in members]))
        lora = agg.get("lora")
        if lora:
            plot.series.append(Series("LoRA", [(lora["context"][0], lora["fidelity"][0], lora["context"][1], lora["fidelity"][1])], PALETTE[0]))
        name = f"sweep_{group}.png"
        render(zoom(plot)).save(os.path.join(out, name))
        written.append(name)
    return written


def write_grid(out: str, rows: Dict[str, List[np.ndarray]], samples: int) -> None:
    """One row per model: the first sample of every prompt."""
    from PIL import Image

    from tlora_trainer.sampling import image_grid

    images, labels = [], []
    for label, imgs in rows.items():
        images += [Image.fromarray(imgs[p * samples]) for p in range(len(PROMPTS))]
        labels.append(label)
    image_grid(images, columns=len(PROMPTS), row_labels=labels, min_cell=96).save(os.path.join(out, "samples.png"))


def _pct(v):
    return f"{100 * v[0]:.0f} ± {100 * v[1]:.0f}"


def compare(a: Dict[str, List[float]], b: Dict[str, List[float]], key: str) -> Tuple[float, bool]:
    """(mean of a - mean of b, whether the difference exceeds twice its standard error over seeds)."""
    diff = a[key][0] - b[key][0]
    stderr = (a[key][1] ** 2 / max(1, a["seeds"]) + b[key][1] ** 2 / max(1, b["seeds"])) ** 0.5
    return diff, abs(diff) > 2 * stderr


def findings(agg, the_settings: List[Setting]) -> List[str]:
    """One line per algorithm: how it differs from LoRA, in numbers, and whether the difference
    is larger than the spread over seeds."""
    lora = agg.get("lora")
    if lora is None:
        return []
    lines = []
    for s in (x for x in the_settings if x.group == "algorithms" and x.algo != "lora"):
        parts = []
        for key, what, scale, unit in (("fidelity", "concept fidelity", 1, ""), ("context", "context following", 100, " points"),
                                       ("copied", "copying of the training context", 100, " points")):
            diff, clear = compare(agg[s.name], lora, key)
            parts.append(f"{what} {diff * scale:+.{3 if scale == 1 else 0}f}{unit}" + ("" if clear else " (within the spread over seeds)"))
        lines.append(f"- {ALGO_TITLES[s.algo]} against LoRA: " + "; ".join(parts) + ".")
    return lines


def seeds_of(setting: Setting, args) -> List[int]:
    """The algorithms run for every --seeds; the sweeps for --sweep_seeds (default: the same)."""
    return list(args.seeds) if setting.group == "algorithms" or args.sweep_seeds is None else list(args.sweep_seeds)


def _seed_text(args) -> str:
    text = f"{len(args.seeds)} seeds: {', '.join(map(str, args.seeds))}"
    if args.sweep_seeds is not None and not args.no_sweeps:
        text += f"; the sweeps {len(args.sweep_seeds)}: {', '.join(map(str, args.sweep_seeds))}"
    return text


def write_page(out: str, agg, references, the_settings, args, plots, seconds: float, trained_now: int, total_runs: int,
               window_agg=None) -> None:
    lines = ["# T-LoRA and the other algorithms on the toy world", "",
             "Generated by `python -m toyworld.experiment " + " ".join(args.argv) + "` "
             f"({seconds / 60:.0f} min on this machine; {trained_now} of {total_runs} trainings ran in that "
             "invocation, the others were reused from `runs/`). Numbers: mean ± standard deviation over training seeds "
             f"({_seed_text(args)}); every run samples {len(PROMPTS)} prompts × {args.samples} images.", "",
             f"Setup: one training image (`examples/sks_toyworld/sks.png`, caption \"{world.SKS_EXAMPLE_CAPTION}\"), "
             f"rank {args.rank} (alpha {args.rank}; linear layers of the transformer blocks and 3x3 convolutions) of `models/toyworld-sd`, AdamW lr {args.learning_rate:g} "
             f"(weight decay 1e-4), {args.steps} steps, batch 1; masked algorithms min_rank {args.min_rank}. Sampling: DDIM "
             f"{args.sampling_steps} steps, guidance {args.guidance:g}, timestep-aware (converters.apply_tlora).", "",
             "The prompts (the training image is large, centred, on gray):", ""]
    lines += [f"- {p}" for p in PROMPTS]
    lines += ["", "## Algorithms", "", "![fidelity vs context](fidelity_vs_context.png)", "",
              "| | concept fidelity | context following | copies the training context | background right | diversity |",
              "|---|---|---|---|---|---|"]
    for s in (x for x in the_settings if x.group == "algorithms"):
        a = agg[s.name]
        lines.append(f"| {ALGO_TITLES.get(s.algo, s.name)} | {a['fidelity'][0]:.3f} ± {a['fidelity'][1]:.3f} | {_pct(a['context'])} % | "
                     f"{_pct(a['copied'])} % | {_pct(a['background_ok'])} % | {a['diversity'][0]:.3f} ± {a['diversity'][1]:.3f} |")
    for label, key in (("base model, no adapter", "base"), ("ground-truth renders", "renders")):
        r = references[key]
        lines.append(f"| *{label}* | {r['fidelity']:.3f} | {100 * r['context']:.0f} % | {100 * r['copied']:.0f} % | "
                     f"{100 * r['background_ok']:.0f} % | {r['diversity']:.3f} |")
    found = findings(agg, the_settings)
    if found:
        lines += ["", "What comes out (differences of the means; \"within the spread\" when a difference is under twice its "
                  "standard error over the seeds):", ""] + found
    lines += ["", f"Samples (seed {args.seeds[0]}, first image of each prompt, prompts in the order above):", "", "![samples](samples.png)", ""]
    for group, title in (("min_rank", "min_rank sweep (T-LoRA)"), ("power", "Schedule power sweep (T-LoRA)")):
        members = [s for s in the_settings if s.group == group]
        if not members:
            continue
        tl = next((s for s in the_settings if s.group == "algorithms" and s.algo == "tlora"), None)
        members = sorted(members + ([tl] if tl else []), key=lambda s: (s.min_rank or 0, s.power or 1.0))
        lines += [f"## {title}", "", f"![{group}](sweep_{group}.png)", "",
                  "| setting | concept fidelity | context following | copies the training context | diversity |", "|---|---|---|---|---|"]
        for s in members:
            a = agg[s.name]
            label = f"min_rank {s.min_rank}, power {s.power if s.power is not None else 1.0:g}"
            lines.append(f"| {label} | {a['fidelity'][0]:.3f} ± {a['fidelity'][1]:.3f} | {_pct(a['context'])} % | {_pct(a['copied'])} % | "
                         f"{a['diversity'][0]:.3f} ± {a['diversity'][1]:.3f} |")
        lines.append("")
    if window_agg:
        lines += ["## Which denoising steps copy the training context", "",
                  f"The same trained files sampled with the adapter switched on at the high-noise steps only (t ≥ {args.split_timestep}, "
                  f"where the image's layout and background form; T-LoRA gives these steps its fewest ranks) or at the low-noise steps "
                  f"only (t < {args.split_timestep}), against the adapter at every step:", "",
                  "| algorithm | adapter at | concept fidelity | context following | copies the training context | background right |",
                  "|---|---|---|---|---|---|"]
        for s in (x for x in the_settings if x.group == "algorithms" and x.algo in args.window_algos):
            for label, a in (("every step", agg[s.name]), (f"t ≥ {args.split_timestep} only", window_agg.get(f"{s.name}@high")),
                             (f"t < {args.split_timestep} only", window_agg.get(f"{s.name}@low"))):
                if a:
                    lines.append(f"| {ALGO_TITLES[s.algo]} | {label} | {a['fidelity'][0]:.3f} ± {a['fidelity'][1]:.3f} | {_pct(a['context'])} % | "
                                 f"{_pct(a['copied'])} % | {_pct(a['background_ok'])} % |")
        lines.append("")
    lines += ["## Metrics", "", "Computed exactly from the images by `toyworld.metrics` (no learned model):", "",
              "- *concept fidelity*: sks fidelity of the best-matching object, the mean of its mask IoU with the heart and the share of "
              "its pixels in the right colour of the pink/teal halves (ground-truth renders: near 1; no object: 0);",
              "- *context following*: the share of what the prompt asks besides the object that the image shows: background colour, "
              "the object's position and size, the other object's shape and colour;",
              "- *copies the training context*: over prompts that ask for another background, position or size, how often the image "
              "shows gray, centre or large instead;",
              "- *diversity*: mean RMS pixel distance between the samples of one prompt.", ""]
    atomic_write_text(os.path.join(out, "README.md"), "\n".join(lines))


# ----------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder (README.md, results.json, plots, runs/)")
    p.add_argument("--model", default=MODEL, help="the toyworld pipeline folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--min_rank", type=int, default=2)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--sweep_min_rank", type=int, nargs="+", default=[1, 2, 4, 6])
    p.add_argument("--sweep_power", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--no_sweeps", action="store_true")
    p.add_argument("--sweep_seeds", type=int, nargs="+", default=None, help="seeds of the min_rank and power sweeps (default: --seeds)")
    p.add_argument("--samples", type=int, default=4, help="images per prompt")
    p.add_argument("--sampling_steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--sample_seed", type=int, default=1000)
    p.add_argument("--split_timestep", type=int, default=500,
                   help="where the timestep-window analysis splits the denoising steps (high noise: t >= this)")
    p.add_argument("--window_algos", nargs="*", default=["lora", "tlora"], choices=ALGOS,
                   help="algorithms sampled a second and third time with the adapter at the high- or low-noise steps only")
    p.add_argument("--jobs", type=int, default=2, help="trainings run side by side (each gets cpu_count / jobs threads)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: must be at least 1")
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args


def main(argv=None) -> int:
    import torch

    from .evaluate import load_pipeline

    args = parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    out = os.path.abspath(args.out)
    run_dir = os.path.join(out, "runs")
    os.makedirs(run_dir, exist_ok=True)
    data = write_example(os.path.join(run_dir, "data"))
    pipe = load_pipeline(args.model)
    the_settings = settings(args)

    rows = {}
    base_images = sample_with(pipe, None, args)
    truth_images = ground_truth(args.samples, args.sample_seed)
    references = {"base": score_run(base_images, args.samples), "renders": score_run(truth_images, args.samples)}
    rows["base model"] = base_images
    per_run: Dict[str, Dict[str, Dict[str, float]]] = {}
    runs = [(s, seed) for s in the_settings for seed in seeds_of(s, args)]
    trained_now = sum(not os.path.exists(run_file(run_dir, s, seed)) for s, seed in runs)
    files = train_all(runs, args, data, run_dir)

    def sample_and_score(s: Setting, seed: int, window: Optional[str], label: str):
        t_run = time.perf_counter()
        images = sample_with(pipe, files[(s, seed)], args, window)
        result = score_run(images, args.samples)
        print(f"{label} {s.name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items())
              + f" ({time.perf_counter() - t_run:.0f}s)", flush=True)
        return images, result

    for done, (s, seed) in enumerate(runs, 1):
        images, result = sample_and_score(s, seed, None, f"[{done}/{len(runs)}]")
        per_run.setdefault(s.name, {})[str(seed)] = result
        if s.group == "algorithms" and seed == args.seeds[0]:
            rows[ALGO_TITLES[s.algo]] = images
    rows["renders"] = truth_images
    per_window: Dict[str, Dict[str, Dict[str, float]]] = {}
    for s in (x for x in the_settings if x.group == "algorithms" and x.algo in args.window_algos):
        for window in ("high", "low"):
            for seed in args.seeds:
                _, result = sample_and_score(s, seed, window, f"adapter at the {window}-noise steps only:")
                per_window.setdefault(f"{s.name}@{window}", {})[str(seed)] = result
    agg = aggregate(per_run)
    window_agg = aggregate(per_window) if per_window else {}
    seconds = time.perf_counter() - t0
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(
        {"settings": [asdict(s) for s in the_settings], "args": {k: v for k, v in vars(args).items()}, "references": references,
         "runs": per_run, "summary": agg, "windows": per_window, "windows_summary": window_agg, "prompts": list(PROMPTS)}, indent=1))
    plots = write_plots(out, agg, references, the_settings, args)
    write_grid(out, rows, args.samples)
    write_page(out, agg, references, the_settings, args, plots, seconds, trained_now, len(runs), window_agg)
    print(f"results: {os.path.join(out, 'README.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
