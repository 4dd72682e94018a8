"""README's first run: presets/demo.toml on the shipped toy model, as a newcomer runs it (from
another folder, the command line only), and what its sample grid shows, measured exactly by the
toy world's metrics: the trained object in the prompted contexts, which the base model without
the LoRA does not draw."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tlora_trainer.sampling import read_prompts
from toyworld import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "presets", "demo.toml")


def grid_cells(path, columns, rows, size=64):
    """The images of a sample grid (rows of `columns` cells after a label strip), back at `size` px."""
    with Image.open(path) as grid:
        grid = grid.convert("RGB")
        cell = grid.height // rows
        label = grid.width - columns * cell
        assert cell % size == 0 and label > 0, (grid.size, columns, rows)
        a = np.asarray(grid)
    step = cell // size  # cells are enlarged by a whole factor (nearest neighbour)
    return [[a[r * cell:(r + 1) * cell:step, label + c * cell:label + (c + 1) * cell:step] for c in range(columns)] for r in range(rows)]


def test_first_run_shows_the_trained_object_in_the_prompted_contexts(tmp_path):
    out = tmp_path / "out"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_tlora.py"), "--config_file", DEMO, "--output_dir", str(out)],
                          cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"network (networks.tlora, timestep-aware): {out / 'demo-tlora.safetensors'}" in proc.stdout
    assert "RANDOM" not in proc.stdout
    assert "1000/1000" in proc.stderr

    prompts = read_prompts(os.path.join(ROOT, "examples", "demo_prompts.txt"))
    grids = sorted((out / "sample").iterdir())
    assert [g.name for g in grids] == ["demo-tlora_00000500.png", "demo-tlora_00001000.png"]
    with_lora, base = grid_cells(grids[-1], columns=len(prompts), rows=2)
    scored = {"lora": [], "base": []}
    for spec, lora_image, base_image in zip(prompts, with_lora, base):
        want = experiment.prompt_spec(spec.prompt)
        scored["lora"].append(experiment.score_image(want, lora_image))
        scored["base"].append(experiment.score_image(want, base_image))
    fidelity = {k: float(np.mean([r["fidelity"] for r in v])) for k, v in scored.items()}
    background = {k: sum(r["background_ok"] for r in v) for k, v in scored.items()}
    # the object is learnt: the LoRA row draws the sks heart (a two-coloured heart scores above 0.5
    # in some prompted context), the base model with the same seeds does not
    assert max(r["fidelity"] for r in scored["lora"]) > 0.5 > max(r["fidelity"] for r in scored["base"]), scored
    assert fidelity["lora"] > fidelity["base"] + 0.08, (fidelity, scored)
    # in the prompted contexts: most of the prompts' backgrounds (four of the five are not the training image's gray)
    assert background["lora"] >= 3, scored
