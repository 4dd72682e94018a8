"""Sample images while training: sd-scripts' prompt files, a diffusers pipeline around the models
being trained, and one PNG grid per sampling run. The network's U-Net hook sets each denoising
step's rank mask from its timestep, so samples show the timestep-aware model."""

import dataclasses
import io
import math
import os
import re
from typing import List, Optional

import torch

from .errors import UsageError
from .fileio import atomic_write_bytes, read_text, writing


@dataclasses.dataclass
class PromptSpec:
    prompt: str
    negative: str = ""
    width: Optional[int] = None
    height: Optional[int] = None
    steps: int = 20
    scale: float = 7.5
    seed: Optional[int] = None


_INT_OPTIONS = {"w": ("width", 8, 8192), "h": ("height", 8, 8192), "s": ("steps", 1, 1000), "d": ("seed", 0, 2**63 - 1)}


def read_prompts(path: str) -> List[PromptSpec]:
    """sd-scripts' prompt file: one prompt a line, options --n --w --h --s --l --d."""
    specs = []
    for number, line in enumerate(read_text(path, "sample_prompts file").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"\s--", " " + line)
        head = parts[0].strip()
        spec = PromptSpec(head if head else parts[1].strip())
        for part in parts[1:] if head else parts[2:]:
            key, _, value = part.partition(" ")
            value = value.strip()
            where = f"{path} line {number}: --{key} {value!r}"
            if key == "n":
                spec.negative = value
            elif key in _INT_OPTIONS:
                field, low, high = _INT_OPTIONS[key]
                try:
                    number_value = int(value)
                except ValueError:
                    raise UsageError(f"{where} is not a whole number") from None
                if not low <= number_value <= high:
                    raise UsageError(f"{where} must be from {low} to {high}")
                if field in ("width", "height") and number_value % 8:
                    raise UsageError(f"{path} line {number}: image size {number_value} is not a multiple of 8")
                setattr(spec, field, number_value)
            elif key == "l":
                try:
                    spec.scale = float(value)
                except ValueError:
                    raise UsageError(f"{where} is not a number") from None
                if not math.isfinite(spec.scale) or not 0 <= spec.scale <= 100:
                    raise UsageError(f"{where} must be a guidance scale from 0 to 100")
        specs.append(spec)
    if not specs:
        raise UsageError(f"sample_prompts file {path} holds no prompts; write one prompt a line")
    return specs


# --sample_sampler name -> diffusers scheduler class (options.SAMPLERS lists the same names)
SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                     "dpmsolver++": "DPMSolverMultistepScheduler", "ddpm": "DDPMScheduler"}


def make_sampling_scheduler(name: str, noise_scheduler):
    import diffusers

    return getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(noise_scheduler.config)


def image_grid(images, columns: int = 4, row_labels: Optional[List[str]] = None, min_cell: int = 128):
    """One image with `columns` per row; cells as large as the largest image (sizes may differ).
    Small images are enlarged (nearest neighbour, whole multiples) so a person can see them;
    `row_labels` puts a caption strip at the left of each row."""
    from PIL import Image, ImageDraw

    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    factor = max(1, math.ceil(min_cell / max(1, min(min(im.width, im.height) for im in images))))
    images = [im.resize((im.width * factor, im.height * factor), Image.NEAREST) if factor > 1 else im for im in images]
    width = max(im.width for im in images)
    height = max(im.height for im in images)
    label_width = 0
    if row_labels:
        label_width = 8 + 7 * max(len(label) for label in row_labels)
    grid = Image.new("RGB", (label_width + columns * width, rows * height), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        grid.paste(image, (label_width + (i % columns) * width, (i // columns) * height))
    for row, label in enumerate(row_labels or []):
        draw.text((4, row * height + height // 2 - 6), label, fill="black")
    return grid


class Sampler:
    """Renders the prompts with the models as they are at a step."""

    def __init__(self, prompts: List[PromptSpec], base, family_name: str, sampler: str, seed: int, width: int, height: int,
                 weight_dtype: torch.dtype):
        self.prompts = prompts
        self.base = base
        self.family_name = family_name
        self.sampler = sampler
        self.seed = seed
        self.width, self.height = width, height
        self.weight_dtype = weight_dtype

    def _pipeline(self):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        b = self.base
        scheduler = make_sampling_scheduler(self.sampler, b.noise_scheduler)
        if self.family_name == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=b.vae, text_encoder=b.text_encoders[0], text_encoder_2=b.text_encoders[1],
                                             tokenizer=b.tokenizers[0], tokenizer_2=b.tokenizers[1], unet=b.unet, scheduler=scheduler)
        else:
            pipe = StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoders[0], tokenizer=b.tokenizers[0], unet=b.unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def render(self, network, autocast, compare_base: bool = False) -> "object":
        """A grid of one image per prompt; with `compare_base` a second row of the same prompts and
        seeds without the network. The training RNG must not notice (or a resumed run would
        differ): everything runs inside fork_rng with its own generators."""
        pipe = self._pipeline()
        vae = self.base.vae
        rows = [("with the network", True)] + ([("base model", False)] if compare_base else [])
        images = []
        network.eval()
        vae.to(dtype=self.weight_dtype)  # the pipelines decode latents in the U-Net's dtype (SDXL's upcasts an fp16 VAE itself)
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad(), autocast():
                for _, enabled in rows:
                    network.set_enabled(enabled)
                    for index, spec in enumerate(self.prompts):
                        generator = torch.Generator().manual_seed(spec.seed if spec.seed is not None else self.seed + index)
                        result = pipe(spec.prompt, negative_prompt=spec.negative or None, width=spec.width or self.width,
                                      height=spec.height or self.height, num_inference_steps=spec.steps, guidance_scale=spec.scale,
                                      generator=generator, output_type="pil")
                        images.append(result.images[0])
        finally:
            network.set_enabled(True)
            vae.to(dtype=torch.float32)
            network.train()
        columns = len(self.prompts) if compare_base else 4
        return image_grid(images, columns, [label for label, _ in rows] if compare_base else None)


def save_png(image, path: str) -> None:
    """Atomically: a grid is either complete or absent."""
    with writing(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
