"""Measure how well a toyworld model follows captions.

    python -m toyworld.evaluate models/toyworld-sd [--n 100] [--steps 25] [--guidance 5]

Draws prompts from the world (a fixed seed, canonical captions that name every attribute),
samples them with diffusers' StableDiffusionPipeline (DDIM), reads every image back with
toyworld.metrics and prints the accuracy of background colour, object colour, shape, size,
position and object count, next to chance level and to the same measurement on ground-truth
renders of the prompts (which must be 100%). Writes a sample grid PNG (prompt i is grid cell i,
listed in the JSON) and, with --json, the numbers.
"""

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see toyworld.pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from . import metrics, world  # noqa: E402


def eval_scenes(n: int, seed: int, p_two: float) -> List[world.Scene]:
    """Prompts for evaluation (jitter off: a prompt does not fix it anyway). One-object prompts
    cycle through the shapes; background, colour, size and position are drawn uniformly."""
    rng = np.random.default_rng([seed, 99])
    n_two = int(round(n * p_two))
    out = []
    for i in range(n - n_two):
        obj = world.Obj(
            world.SHAPES[i % len(world.SHAPES)],
            list(world.OBJECT_COLOURS)[rng.integers(len(world.OBJECT_COLOURS))],
            ("small", "large")[rng.integers(2)],
            list(world.POSITIONS)[rng.integers(len(world.POSITIONS))],
        )
        out.append(world.Scene(list(world.BACKGROUND_COLOURS)[rng.integers(len(world.BACKGROUND_COLOURS))], (obj,)))
    for _ in range(n_two):
        out.append(world.random_scene(rng, p_two=1.0, jitter=False))
    return out


def load_pipeline(folder: str, scheduler: str = "ddim"):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompts: List[str], steps: int, guidance: float, seed: int, batch: int = 16, size: int = 64) -> List[np.ndarray]:
    """uint8 HxWx3 images, one per prompt; prompt i uses the generator seeded with seed + i, so a
    sample does not depend on the batch size."""
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, height=size, width=size, output_type="np").images
        out += [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in images]
    return out


def score(scenes: List[world.Scene], images: List[np.ndarray]) -> Dict[str, Dict[str, float]]:
    """Accuracy per attribute, for one-object prompts, two-object prompts and all."""
    groups: Dict[str, Dict[str, List[bool]]] = {"one object": {}, "two objects": {}, "all": {}}
    for scene, image in zip(scenes, images):
        r = metrics.compare(scene, metrics.measure(image))
        g = "one object" if len(scene.objects) == 1 else "two objects"
        for key, ok in r.items():
            if ok is None:
                continue
            groups[g].setdefault(key, []).append(bool(ok))
            groups["all"].setdefault(key, []).append(bool(ok))
    return {g: {k: float(np.mean(v)) for k, v in d.items()} | {"n": max(len(v) for v in d.values()) if d else 0} for g, d in groups.items()}


def grid(images: List[np.ndarray], cols: int = 8, upscale: int = 3):
    from PIL import Image

    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    canvas = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = im
    return Image.fromarray(canvas).resize((canvas.shape[1] * upscale, canvas.shape[0] * upscale), Image.NEAREST)


def format_table(results: Dict[str, Dict[str, float]], truth: Dict[str, Dict[str, float]]) -> str:
    chance = metrics.chance_levels()
    lines = ["| attribute | one object | two objects | all | chance (one object) | ground-truth renders |", "|---|---|---|---|---|---|"]
    for key in ("background", "colour", "shape", "size", "position", "count"):
        cells = []
        for g in ("one object", "two objects", "all"):
            v = results.get(g, {}).get(key)
            cells.append("—" if v is None else f"{100 * v:.0f}%")
        ch = chance.get(key)
        tr = truth.get("all", {}).get(key)
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {'—' if ch is None else f'{100 * ch:.0f}%'} | {'—' if tr is None else f'{100 * tr:.0f}%'} |")
    lines.append(f"| prompts | {results['one object']['n']} | {results['two objects']['n']} | {results['all']['n']} | | |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a StableDiffusionPipeline folder made by toyworld.pretrain")
    p.add_argument("--n", type=int, default=100, help="number of prompts")
    p.add_argument("--two", type=float, default=0.3, help="share of two-object prompts")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", default=None, help="sample grid PNG (default: <model>/samples.png)")
    p.add_argument("--grid_n", type=int, default=32)
    p.add_argument("--json", default=None, help="write the numbers here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import diffusers
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    scenes = eval_scenes(args.n, args.seed, args.two)
    prompts = [world.caption(s) for s in scenes]
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = sample(pipe, prompts, args.steps, args.guidance, args.seed, batch=args.batch)
    t_sample = time.perf_counter() - t0
    results = score(scenes, images)
    truth = score(scenes, [world.render(s) for s in scenes])
    grid_path = args.grid or os.path.join(args.model, "samples.png")
    grid(images[:args.grid_n]).save(grid_path)
    print(f"model {args.model}: diffusers {diffusers.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"{args.n} prompts, DDIM {args.steps} steps, guidance {args.guidance}, seed {args.seed}; "
          f"load {t_load:.1f}s, sampling {t_sample:.1f}s ({t_sample / args.n:.2f} s/image)")
    print(format_table(results, truth))
    print(f"grid of the first {min(args.grid_n, len(images))} samples: {grid_path}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({
                "model": args.model, "n": args.n, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
                "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
                "accuracy": results, "ground_truth": truth, "chance": metrics.chance_levels(),
                "seconds": {"load": t_load, "sampling": t_sample}, "grid_prompts": prompts[:args.grid_n],
            }, f, indent=1)
    return results


if __name__ == "__main__":
    main()
