#!/usr/bin/env python
"""train_tlora.py: a standalone T-LoRA / Ortho-LoRA / TriLoRA / LoRA trainer on diffusers,
transformers and accelerate, using the sd-scripts network module `networks.tlora` directly.

Arguments use kohya-ss sd-scripts' names, and `--config_file x.toml` is read the way sd-scripts
reads it (every table's keys become argument names, command-line flags override), so the same
preset drives both programs:

    python train_tlora.py --config_file presets/demo.toml          # no downloads, ~1 minute on CPU
    accelerate launch train_tlora.py --config_file presets/tlora-object-sdxl.toml \\
        --pretrained_model_name_or_path /models/sdxl-base --train_data_dir data/dog.png \\
        --instance_prompt "a photo of sks dog" --output_dir out

Base model: a local diffusers folder, a single-file checkpoint (.safetensors/.ckpt, read with
diffusers' from_single_file, never downloading), or `random:sd1-tiny` / `random:sdxl-tiny`:
small random-weight models of the SD 1.x / SDXL layouts built from configs (for the demo and
tests; what they learn is meaningless).
"""

import argparse
import ast
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:  # `networks/` (namespace package) and `converters/` live beside this file
    sys.path.insert(0, ROOT)

logger = logging.getLogger("train_tlora")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
RANDOM_PREFIX = "random:"
FAMILIES = ("sd1", "sd2", "sdxl")
EXIT_BAD_INPUT = 2
EXIT_NAN = 3


class UsageError(Exception):
    """Bad input found before any model is loaded; the message says what to fix."""


class ModelLoadError(Exception):
    """The base model could not be read (the message says why and what to do)."""


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


# ============================================================================ arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_tlora.py",
        description="Train T-LoRA / Ortho-LoRA / TriLoRA / LoRA with diffusers; sd-scripts argument names.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    # model and data
    a("--config_file", type=str, default=None, help="TOML read as sd-scripts does: every table's keys are argument names; CLI overrides")
    a("--pretrained_model_name_or_path", type=str, default=None,
      help="local diffusers folder, single-file checkpoint, or random:sd1-tiny / random:sdxl-tiny (random weights, for the demo)")
    a("--v2", action="store_true", help="accepted for sd-scripts compatibility; SD 2.x is detected from the model")
    a("--v_parameterization", action="store_true", help="train with v-prediction (SD 2.x 768-v models)")
    a("--train_data_dir", type=str, default=None, help="one image, a folder of images, or a folder of sd-scripts <repeats>_<class> folders")
    a("--instance_prompt", type=str, default=None, help="caption for images without a caption file (train_tlora only)")
    a("--caption_extension", type=str, default=".caption", help="caption file extension, as sd-scripts (use .txt for .txt files)")
    a("--resolution", type=str, default="512", help="'size' or 'width,height', multiples of 8")
    a("--clip_skip", type=int, default=None, help="SD 1.x/2.x: use the output of the n-th last text encoder layer")
    a("--max_token_length", type=int, default=None, help="accepted for compatibility; only 75 tokens are used")
    # network
    a("--network_module", type=str, default="networks.tlora", help="must be networks.tlora")
    a("--network_dim", type=int, default=None, help="rank (default 4)")
    a("--network_alpha", type=float, default=1.0, help="alpha; the change is scaled by alpha/rank")
    a("--network_dropout", type=float, default=None, help="dropout on the down projection's output")
    a("--network_args", type=str, default=None, nargs="*", help="key=value options of networks.tlora, e.g. algo=tlora min_rank=32")
    a("--network_weights", type=str, default=None, help="start from the weights of this networks.tlora file")
    a("--network_train_unet_only", action="store_true", help="adapt only the U-Net (the paper's setting)")
    a("--network_train_text_encoder_only", action="store_true", help="adapt only the text encoder(s)")
    # optimisation
    a("--optimizer_type", type=str, default="AdamW", help="AdamW, AdamW8bit (bitsandbytes) or Prodigy (prodigyopt)")
    a("--optimizer_args", type=str, default=None, nargs="*", help="key=value optimiser options, e.g. weight_decay=1e-4")
    a("--learning_rate", type=float, default=1e-4, help="default learning rate")
    a("--unet_lr", type=float, default=None, help="U-Net learning rate (default: learning_rate)")
    a("--text_encoder_lr", type=float, default=None, nargs="*", help="text encoder learning rate(s) (default: learning_rate)")
    a("--lr_scheduler", type=str, default="constant", help="constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial")
    a("--lr_warmup_steps", type=int, default=0, help="warm-up steps of the learning-rate schedule")
    a("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm; 0 disables")
    a("--max_train_steps", type=int, default=1600, help="training steps")
    a("--train_batch_size", type=int, default=1, help="batch size per process")
    a("--seed", type=int, default=None, help="random seed (default 42)")
    a("--min_timestep", type=int, default=None, help="lowest training timestep (default 0)")
    a("--max_timestep", type=int, default=None, help="highest training timestep + 1 (default 1000)")
    a("--noise_offset", type=float, default=None, help="noise offset, as sd-scripts")
    a("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="mixed precision")
    a("--full_fp16", action="store_true", help="not supported (network weights stay fp32)")
    a("--full_bf16", action="store_true", help="not supported (network weights stay fp32)")
    a("--gradient_checkpointing", action="store_true", help="recompute activations in backward to save memory")
    a("--gradient_accumulation_steps", type=int, default=1, help="only 1 is supported")
    a("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default of diffusers)")
    a("--xformers", action="store_true", help="xformers attention when installed")
    a("--mem_eff_attn", action="store_true", help="accepted for compatibility; SDPA is used")
    a("--cache_latents", action="store_true", help="accepted for compatibility; latents are always cached (no augmentation)")
    a("--cache_latents_to_disk", action="store_true", help="accepted for compatibility; latents are cached in memory")
    a("--max_data_loader_n_workers", type=int, default=None, help="accepted for compatibility")
    a("--persistent_data_loader_workers", action="store_true", help="accepted for compatibility")
    a("--no_half_vae", action="store_true", help="accepted for compatibility; the VAE always runs in fp32")
    # outputs
    a("--output_dir", type=str, default=None, help="where outputs go")
    a("--output_name", type=str, default="last", help="base name of the output files")
    a("--save_model_as", type=str, default="safetensors", help="only safetensors")
    a("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"], help="dtype of saved weights")
    a("--save_every_n_steps", type=int, default=None, help="save weights and a resumable state every N steps")
    a("--resume", type=str, default=None, help="a <name>-stepNNNNNNNN-state folder, or 'latest' (newest in output_dir)")
    a("--save_kohya", action="store_true", help="also write <name>-kohya.safetensors, a standard LoRA file (train_tlora only)")
    a("--save_diffusers", action="store_true", help="also write <name>-diffusers.safetensors (train_tlora only)")
    a("--no_metadata", action="store_true", help="write only the network's own metadata")
    a("--training_comment", type=str, default=None, help="stored in the metadata")
    a("--metadata_title", type=str, default=None, help="stored in the metadata")
    a("--metadata_author", type=str, default=None, help="stored in the metadata")
    a("--metadata_description", type=str, default=None, help="stored in the metadata")
    a("--metadata_license", type=str, default=None, help="stored in the metadata")
    a("--metadata_tags", type=str, default=None,
      help="comma-separated tags; a tag sd1, sd2 or sdxl makes train_tlora refuse a base model of another family")
    # samples and logs
    a("--sample_every_n_steps", type=int, default=None, help="sample images every N steps")
    a("--sample_at_first", action="store_true", help="also sample before training")
    a("--sample_prompts", type=str, default=None, help="text file, one prompt a line; options --w --h --s --l --d --n as sd-scripts")
    a("--sample_sampler", type=str, default="ddim", help="ddim, euler, euler_a, dpmsolver++, ddpm")
    a("--logging_dir", type=str, default=None, help="TensorBoard logs (needs the tensorboard package)")
    a("--log_prefix", type=str, default=None, help="prefix of the TensorBoard run folder")
    return p


# sd-scripts keys train_tlora accepts only with one value (others are refused with a message)
UNSUPPORTED_VALUES = {
    "gradient_accumulation_steps": (1,),
    "full_fp16": (False,),
    "full_bf16": (False,),
    "save_model_as": ("safetensors",),
}
PATH_KEYS = ("pretrained_model_name_or_path", "train_data_dir", "sample_prompts", "network_weights")


def _coerce(action: argparse.Action, value, source: str):
    """Give a TOML value the type the argument expects (argparse does not convert namespace values)."""
    key = action.dest
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    kind = action.type or str
    if action.nargs in ("*", "+"):
        values = value if isinstance(value, list) else [value]
        try:
            return [kind(v) if not (kind is str and isinstance(v, str)) else v for v in values]
        except (TypeError, ValueError):
            raise UsageError(f"{source}: {key} must be a list of {kind.__name__} values, got {value!r}") from None
    if key == "resolution" and isinstance(value, (int, list)):
        return ",".join(str(v) for v in (value if isinstance(value, list) else [value]))
    if isinstance(value, (list, dict)):
        raise UsageError(f"{source}: {key} must be a single {kind.__name__}, got {value!r}")
    if isinstance(value, bool) and kind is not str:
        raise UsageError(f"{source}: {key} must be a {kind.__name__}, got {value!r}")
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"{source}: {key}={value!r} is not a valid {kind.__name__}") from None
    if kind is int and isinstance(value, float) and value != converted:
        raise UsageError(f"{source}: {key}={value!r} must be a whole number")
    if action.choices is not None and converted not in action.choices:
        raise UsageError(f"{source}: {key}={value!r} is not one of {', '.join(str(c) for c in action.choices)}")
    return converted


def read_config_file(path: str) -> Dict[str, object]:
    """sd-scripts' read_config_from_file: top-level keys as they are, every table flattened."""
    import toml

    if not os.path.isfile(path):
        raise UsageError(f"config file {path} not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = toml.load(f)
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    flat: Dict[str, object] = {}
    for section, value in raw.items():
        if isinstance(value, dict):
            for key, inner in value.items():
                flat[key] = inner
        else:
            flat[section] = value
    return flat


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    first = parser.parse_args(argv)
    config_keys: List[str] = []
    if first.config_file:
        path = first.config_file if first.config_file.endswith(".toml") else first.config_file + ".toml"
        flat = read_config_file(path)
        actions = {action.dest: action for action in parser._actions if action.dest != "help"}
        unknown = [k for k in flat if k not in actions]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, list(actions), n=1)
                hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise UsageError(
                f"{path}: unknown config key(s) {', '.join(hints)}. train_tlora.py takes sd-scripts' argument names; "
                f"see `python train_tlora.py --help`, and remove or rename the key(s)"
            )
        for key in ("config_file",):
            flat.pop(key, None)
        values = {k: _coerce(actions[k], v, path) for k, v in flat.items()}
        config_keys = list(values)
        # exactly sd-scripts: the namespace holds the file's values; flags on the command line override
        args = parser.parse_args(argv, namespace=argparse.Namespace(**values))
        args.config_file = path
        # paths in a preset that do not exist relative to the working directory are also looked
        # up beside train_tlora.py (so the demo preset runs from any folder)
        for key in PATH_KEYS:
            value = getattr(args, key)
            if key in values and key not in _cli_dests(parser, argv) and isinstance(value, str) and not value.startswith(RANDOM_PREFIX):
                if not os.path.exists(value) and not os.path.isabs(value) and os.path.exists(os.path.join(ROOT, value)):
                    setattr(args, key, os.path.join(ROOT, value))
    else:
        args = first
    args._config_keys = config_keys
    return args


def _cli_dests(parser, argv) -> set:
    dests = set()
    for action in parser._actions:
        for option in action.option_strings:
            if any(arg == option or arg.startswith(option + "=") for arg in argv):
                dests.add(action.dest)
    return dests


def parse_resolution(value) -> Tuple[int, int]:
    text = str(value).strip()
    try:
        parts = [int(p.strip()) for p in text.split(",")]
    except ValueError:
        raise UsageError(f"resolution={value!r}: give 'size' or 'width,height' in pixels, e.g. 512 or 768,512") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise UsageError(f"resolution={value!r}: give 'size' or 'width,height' in pixels, e.g. 512 or 768,512")
    for size in parts:
        if size % 8 != 0:
            low, high = size // 8 * 8, size // 8 * 8 + 8
            raise UsageError(f"resolution {size} is not a multiple of 8 (the VAE downsamples by 8); use {low or 8} or {high}")
    return parts[0], parts[1]  # width, height


def parse_key_values(values, what: str) -> Dict[str, str]:
    result = {}
    for item in values or []:
        if "=" not in item:
            raise UsageError(f"{what}: {item!r} is not key=value")
        key, value = item.split("=", 1)  # sd-scripts splits on the first '='
        result[key.strip()] = value.strip()
    return result


# ============================================================================ data


@dataclasses.dataclass
class Sample:
    path: str
    caption: str
    repeats: int


def _images_in(folder: str) -> List[str]:
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, name))
    )


def _caption_for(image: str, caption_extension: str, fallback: Optional[str]) -> str:
    caption_file = os.path.splitext(image)[0] + caption_extension
    if os.path.isfile(caption_file):
        with open(caption_file, "r", encoding="utf-8") as f:
            text = f.read().strip()
        if text:
            return text
    if fallback:
        return fallback
    raise UsageError(
        f"{image} has no caption: put one in {os.path.basename(caption_file)} (--caption_extension {caption_extension}), "
        f"or give --instance_prompt, or use a <repeats>_<class> folder"
    )


def collect_samples(train_data_dir: Optional[str], caption_extension: str, instance_prompt: Optional[str]) -> List[Sample]:
    """One image, a folder of images, or sd-scripts' <repeats>_<class tokens> folders."""
    if not train_data_dir:
        raise UsageError("no training data: give --train_data_dir (one image, a folder of images, or <repeats>_<class> folders)")
    if not os.path.exists(train_data_dir):
        raise UsageError(f"train_data_dir {train_data_dir} does not exist; give an image file or a folder of images")
    if os.path.isfile(train_data_dir):
        if not train_data_dir.lower().endswith(IMAGE_EXTENSIONS):
            raise UsageError(f"train_data_dir {train_data_dir} is a file but not an image ({', '.join(IMAGE_EXTENSIONS)})")
        return [Sample(train_data_dir, _caption_for(train_data_dir, caption_extension, instance_prompt), 1)]
    samples = [Sample(p, _caption_for(p, caption_extension, instance_prompt), 1) for p in _images_in(train_data_dir)]
    for name in sorted(os.listdir(train_data_dir)):
        sub = os.path.join(train_data_dir, name)
        match = REPEAT_FOLDER.match(name)
        if not os.path.isdir(sub) or not match:
            continue
        repeats, class_tokens = int(match.group(1)), match.group(2).replace("_", " ").strip()
        if repeats < 1:
            raise UsageError(f"{sub}: the repeat count in the folder name must be at least 1")
        for image in _images_in(sub):
            samples.append(Sample(image, _caption_for(image, caption_extension, instance_prompt or class_tokens), repeats))
    if not samples:
        raise UsageError(
            f"train_data_dir {train_data_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no sd-scripts "
            f"<repeats>_<class> folders (e.g. 10_sks dog/) with images; add images or point at the right folder"
        )
    return samples


def check_images(samples: List[Sample]) -> None:
    from PIL import Image, UnidentifiedImageError

    for sample in samples:
        try:
            with Image.open(sample.path) as image:
                image.load()
                if image.width < 8 or image.height < 8:
                    raise UsageError(f"image {sample.path} is only {image.width}x{image.height} pixels")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise UsageError(f"image {sample.path} cannot be read ({e}); replace or remove it") from None


def load_image_tensor(path: str, width: int, height: int):
    """RGB in [-1, 1], resized to cover width x height and centre-cropped (no augmentation)."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.LANCZOS)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def sample_index(position: int, count: int, seed: int) -> int:
    """Dataset index of the `position`-th sample drawn in the whole run (all processes): a fresh
    permutation every epoch, a pure function of (seed, position) so a resumed run sees the same data."""
    import torch

    epoch, offset = divmod(position, count)
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    return int(torch.randperm(count, generator=generator)[offset])


# ============================================================================ base models


@dataclasses.dataclass
class ModelInfo:
    family: str  # sd1 | sd2 | sdxl
    kind: str  # random | diffusers | single_file


RANDOM_MODELS = {"sd1-tiny": "sd1", "sdxl-tiny": "sdxl"}


def inspect_model(path: Optional[str]) -> ModelInfo:
    """The family of a base model from its config or file header, without loading weights."""
    if not path:
        raise UsageError("no base model: give --pretrained_model_name_or_path (a diffusers folder, a .safetensors/.ckpt file, or random:sd1-tiny)")
    if path.startswith(RANDOM_PREFIX):
        name = path[len(RANDOM_PREFIX):]
        if name not in RANDOM_MODELS:
            raise UsageError(f"{path}: unknown random model; use one of {', '.join(RANDOM_PREFIX + n for n in RANDOM_MODELS)}")
        return ModelInfo(RANDOM_MODELS[name], "random")
    if not os.path.exists(path):
        raise UsageError(
            f"base model {path} not found. train_tlora.py never downloads: give a local diffusers folder or a "
            f"single-file checkpoint (or random:sd1-tiny for the demo)"
        )
    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        unet_config = os.path.join(path, "unet", "config.json")
        if not os.path.isfile(index) or not os.path.isfile(unet_config):
            raise UsageError(f"{path} is a folder but not a diffusers model (no model_index.json and unet/config.json)")
        with open(index, "r", encoding="utf-8") as f:
            class_name = json.load(f).get("_class_name", "")
        with open(unet_config, "r", encoding="utf-8") as f:
            unet = json.load(f)
        if "XL" in class_name or unet.get("addition_embed_type") == "text_time":
            return ModelInfo("sdxl", "diffusers")
        return ModelInfo("sd2" if unet.get("cross_attention_dim") == 1024 else "sd1", "diffusers")
    family = None
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # noqa: BLE001 - any header problem means an unusable file
            raise UsageError(f"base model {path} is not a readable safetensors file ({e})") from None
        if any(k.startswith("conditioner.embedders.1") for k in keys):
            family = "sdxl"
        elif any(k.startswith("cond_stage_model.model.") for k in keys):
            family = "sd2"
        elif any(k.startswith("cond_stage_model.transformer") for k in keys):
            family = "sd1"
        else:
            raise UsageError(f"{path} does not look like an SD 1.x / 2.x / SDXL checkpoint (no known text encoder keys)")
    elif not path.endswith((".ckpt", ".pt", ".pth", ".bin")):
        raise UsageError(f"{path}: a single-file checkpoint must be .safetensors or .ckpt")
    return ModelInfo(family or "unknown", "single_file")


def expected_families(args) -> List[str]:
    tags = [t.strip().lower() for t in (args.metadata_tags or "").split(",")]
    return [t for t in tags if t in FAMILIES]


def _byte_level_tokenizer():
    """A CLIPTokenizer over single byte-level characters (no merges), built without downloads."""
    from tlora_trainer.tokenizers import clip_tokenizer

    return clip_tokenizer()


def build_random_model(name: str, seed: int):
    """Small random-weight models with the SD 1.x / SDXL module layouts (diffusers classes).

    Attention sits at the 64-channel level only, so every layer allows rank 64 (the presets' rank)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    tokenizer = _byte_level_tokenizer()

    def clip(hidden, projection=False):
        config = CLIPTextConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=hidden,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    sdxl = RANDOM_MODELS[name] == "sdxl"
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), sample_size=128, scaling_factor=0.13025 if sdxl else 0.18215,
    )
    if sdxl:
        text_encoders = [clip(64), clip(64, projection=True)]
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=128, attention_head_dim=(4, 8), transformer_layers_per_block=(1, 2),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=64 + 6 * 8, norm_num_groups=8,
        )
        tokenizers = [tokenizer, _byte_level_tokenizer()]
    else:
        text_encoders = [clip(64)]
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
        )
        tokenizers = [tokenizer]
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1)
    torch.random.set_rng_state(generator_state)
    return tokenizers, text_encoders, vae, unet, scheduler


def load_base_model(path: str, info: ModelInfo, seed: int):
    """(tokenizers, text_encoders, vae, unet, noise_scheduler); never downloads."""
    from diffusers import DDPMScheduler

    if info.kind == "random":
        return build_random_model(path[len(RANDOM_PREFIX):], seed)
    if info.kind == "diffusers":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        kw = dict(local_files_only=True)
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)]
        text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)]
        if info.family == "sdxl":
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw))
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw))
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        return tokenizers, text_encoders, vae, unet, scheduler
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if info.family == "sdxl" else StableDiffusionPipeline
    try:
        pipe = cls.from_single_file(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds here
        raise ModelLoadError(
            f"diffusers could not read the single-file checkpoint {path} without downloading ({type(e).__name__}: {e}). "
            f"from_single_file needs the model's config files in the Hugging Face cache; convert the checkpoint to a "
            f"diffusers folder once on a machine with access, or pass such a folder"
        ) from e
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if info.family == "sdxl" else [])
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if info.family == "sdxl" else [])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return tokenizers, text_encoders, pipe.vae, pipe.unet, scheduler


def detect_family(text_encoders, unet) -> str:
    if len(text_encoders) == 2 or getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd2" if unet.config.cross_attention_dim == 1024 else "sd1"


# ============================================================================ conditioning


class Conditioner:
    """Text conditioning of SD 1.x/2.x (one CLIP) and SDXL (two CLIPs, pooled, time ids)."""

    def __init__(self, family, tokenizers, text_encoders, clip_skip, width, height):
        self.family = family
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.clip_skip = clip_skip
        self.width, self.height = width, height

    def tokenize(self, captions: List[str]):
        return [
            tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            for tok in self.tokenizers
        ]

    def encode(self, input_ids, device):
        """(encoder_hidden_states, added_cond_kwargs or None)."""
        import torch

        if self.family != "sdxl":
            te = self.text_encoders[0]
            if self.clip_skip is None or self.clip_skip <= 1:
                return te(input_ids[0].to(device))[0], None
            out = te(input_ids[0].to(device), output_hidden_states=True)
            hidden = out.hidden_states[-self.clip_skip]
            return te.text_model.final_layer_norm(hidden), None
        states = []
        pooled = None
        for te, ids in zip(self.text_encoders, input_ids):
            out = te(ids.to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        hidden = torch.cat(states, dim=-1)
        batch = hidden.shape[0]
        time_ids = torch.tensor([[self.height, self.width, 0, 0, self.height, self.width]], dtype=hidden.dtype, device=device)
        return hidden, {"text_embeds": pooled, "time_ids": time_ids.repeat(batch, 1)}


# ============================================================================ training module


def _training_module_class():
    import torch

    class TrainingModule(torch.nn.Module):
        """What accelerate wraps for DDP: the network's parameters (a child module), with the
        U-Net and text encoders held outside the module tree (frozen, never broadcast)."""

        def __init__(self, network, unet, conditioner, train_text_encoder):
            super().__init__()
            self.network = network
            self._frozen = [unet, conditioner]
            self.train_text_encoder = train_text_encoder

        def forward(self, noisy_latents, timesteps, input_ids, cached_hidden, cached_added):
            unet, conditioner = self._frozen
            if self.train_text_encoder:
                hidden, added = conditioner.encode(input_ids, noisy_latents.device)
            else:
                hidden, added = cached_hidden, cached_added
            kwargs = {"added_cond_kwargs": added} if added is not None else {}
            return unet(noisy_latents, timesteps, hidden.to(noisy_latents.dtype), **kwargs).sample

    return TrainingModule


def compute_loss(prediction, target):
    """Mean squared error in float32 (a module-level function so tests can inject a NaN)."""
    import torch.nn.functional as F

    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


# ============================================================================ optimiser


def build_optimizer(args, param_groups):
    import torch

    kind = args.optimizer_type.lower()
    options = {}
    for key, value in parse_key_values(args.optimizer_args, "optimizer_args").items():
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    if kind == "adamw":
        return torch.optim.AdamW(param_groups, lr=args.learning_rate, **options)
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, lr=args.learning_rate, **options)
    if kind == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(param_groups, lr=args.learning_rate, **options)
    raise UsageError(f"optimizer_type={args.optimizer_type!r} is not supported; use AdamW, AdamW8bit or Prodigy")


def check_optimizer(args) -> None:
    kind = (args.optimizer_type or "").lower()
    if kind not in ("adamw", "adamw8bit", "prodigy"):
        raise UsageError(f"optimizer_type={args.optimizer_type!r} is not supported; use AdamW, AdamW8bit or Prodigy")
    module = {"adamw8bit": ("bitsandbytes", "pip install bitsandbytes"), "prodigy": ("prodigyopt", "pip install prodigyopt")}.get(kind)
    if module is not None:
        import importlib.util

        if importlib.util.find_spec(module[0]) is None:
            raise UsageError(
                f"optimizer_type={args.optimizer_type} needs the {module[0]} package, which is not installed: "
                f"run `{module[1]}`, or use --optimizer_type AdamW"
            )
    parse_key_values(args.optimizer_args, "optimizer_args")


# ============================================================================ sampling


SAMPLERS = ("ddim", "euler", "euler_a", "dpmsolver++", "ddpm")


@dataclasses.dataclass
class PromptSpec:
    prompt: str
    negative: str = ""
    width: Optional[int] = None
    height: Optional[int] = None
    steps: int = 20
    scale: float = 7.5
    seed: Optional[int] = None


def read_prompts(path: str) -> List[PromptSpec]:
    """sd-scripts' prompt file: one prompt a line, options --n --w --h --s --l --d."""
    if not os.path.isfile(path):
        raise UsageError(f"sample_prompts file {path} not found")
    specs = []
    with open(path, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = re.split(r"\s--", " " + line)
            spec = PromptSpec(parts[0].strip() if parts[0].strip() else parts[1].strip())
            if not parts[0].strip():
                parts = parts[1:]
            for part in parts[1:]:
                key, _, value = part.partition(" ")
                value = value.strip()
                try:
                    if key == "n":
                        spec.negative = value
                    elif key == "w":
                        spec.width = int(value)
                    elif key == "h":
                        spec.height = int(value)
                    elif key == "s":
                        spec.steps = int(value)
                    elif key == "l":
                        spec.scale = float(value)
                    elif key == "d":
                        spec.seed = int(value)
                except ValueError:
                    raise UsageError(f"{path} line {number}: --{key} {value!r} is not a number") from None
            for size in (spec.width, spec.height):
                if size is not None and size % 8:
                    raise UsageError(f"{path} line {number}: image size {size} is not a multiple of 8")
            specs.append(spec)
    if not specs:
        raise UsageError(f"sample_prompts file {path} holds no prompts")
    return specs


def make_sampling_scheduler(name, noise_scheduler):
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler)

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
           "dpmsolver++": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}[name]
    return cls.from_config(noise_scheduler.config)


def image_grid(images, columns=4):
    from PIL import Image

    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    width = max(im.width for im in images)
    height = max(im.height for im in images)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


# ============================================================================ checkpoints


def _fsync_tree(folder):
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def state_dir_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}-state"


def find_latest_state(output_dir: str, output_name: str) -> Optional[str]:
    if not output_dir or not os.path.isdir(output_dir):
        return None
    pattern = re.compile(re.escape(output_name) + r"-step(\d{8})-state$")
    found = sorted((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := pattern.match(name)))
    return os.path.join(output_dir, found[-1][1]) if found else None


def rng_state(noise_generator):
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state(),
             "noise": noise_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, noise_generator):
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    noise_generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ============================================================================ outputs


def base_model_version(family: str) -> str:
    return {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(family, family)


def build_metadata(args, family, resolution, step, samples) -> Dict[str, str]:
    if args.no_metadata:
        return {}
    architecture = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base"}.get(family, family)
    metadata = {
        "ss_network_module": "networks.tlora",
        "ss_network_args": json.dumps(parse_key_values(args.network_args, "network_args")),
        "ss_base_model_version": base_model_version(family),
        "ss_v2": str(family == "sd2"),
        "ss_output_name": args.output_name,
        "ss_sd_model_name": os.path.basename(str(args.pretrained_model_name_or_path).rstrip("/")),
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_steps": str(step),
        "ss_max_train_steps": str(args.max_train_steps),
        "ss_learning_rate": str(args.learning_rate),
        "ss_unet_lr": str(args.unet_lr),
        "ss_text_encoder_lr": str(args.text_encoder_lr),
        "ss_optimizer": f"{args.optimizer_type}({' '.join(args.optimizer_args or [])})",
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_batch_size_per_device": str(args.train_batch_size),
        "ss_mixed_precision": args.mixed_precision,
        "ss_seed": str(args.seed),
        "ss_num_train_images": str(sum(s.repeats for s in samples)),
        "ss_network_train_unet_only": str(bool(args.network_train_unet_only)),
        "ss_training_comment": str(args.training_comment),
        "ss_trainer": "train_tlora.py",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": args.metadata_title or args.output_name,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
    }
    for key in ("author", "description", "license", "tags"):
        value = getattr(args, f"metadata_{key}")
        if value:
            metadata[f"modelspec.{key}"] = value
    return metadata


def resolved_config(args) -> Dict[str, object]:
    """Flat TOML of every argument that differs from its default (sd-scripts' --output_config style)."""
    defaults = vars(build_parser().parse_args([]))
    out = {}
    for key, value in sorted(vars(args).items()):
        if key.startswith("_") or key in ("config_file", "resume"):
            continue
        if key in defaults and value == defaults[key] and key not in getattr(args, "_config_keys", []):
            continue
        if value is None:
            continue
        out[key] = value
    return out


def write_text_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def convert_outputs(native_path: str, args, family: str, unet) -> List[str]:
    """Standard LoRA files through `converters`, with every rank active (the time-independent
    "full" mask: what any loader that knows no timesteps applies). Other masks and ranks:
    `python -m converters to-kohya --help`."""
    targets = [t for t, wanted in (("kohya", args.save_kohya), ("diffusers", args.save_diffusers)) if wanted]
    if not targets:
        return []
    try:
        from converters import convert_file
    except ImportError as e:
        logger.warning("converted outputs skipped: the converters package is not available (%s); "
                       "convert later with `python -m converters to-kohya %s`", e, native_path)
        return []
    layers_per_block = getattr(unet.config, "layers_per_block", 2)
    written = []
    for target in targets:
        out = native_path[: -len(".safetensors")] + f"-{target}.safetensors"
        report = convert_file(native_path, out, target=target, mask="full", base=family,
                              layers_per_block=layers_per_block if isinstance(layers_per_block, int) else 2,
                              instance_prompt=args.instance_prompt)
        logger.info("converted to %s: %s", target, report.text() if hasattr(report, "text") else report)
        written.append(out)
    return written


# ============================================================================ validation


def validate(args):
    """Everything that can be checked without loading a model. Raises UsageError."""
    if args.network_module not in ("networks.tlora", "networks.tlora.py"):
        raise UsageError(f"network_module={args.network_module!r}: train_tlora.py trains only networks.tlora")
    for key, allowed in UNSUPPORTED_VALUES.items():
        if getattr(args, key) not in allowed:
            raise UsageError(f"{key}={getattr(args, key)!r} is not supported by train_tlora.py; remove it or use {allowed[0]!r}")
    if not args.output_dir:
        raise UsageError("give --output_dir (where the network file, checkpoints and samples go)")
    resolution = parse_resolution(args.resolution)
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UsageError("network_train_unet_only and network_train_text_encoder_only exclude each other")
    for key in ("max_train_steps", "train_batch_size"):
        if getattr(args, key) is None or getattr(args, key) < 1:
            raise UsageError(f"{key} must be at least 1, got {getattr(args, key)}")
    for key in ("save_every_n_steps", "sample_every_n_steps"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UsageError(f"{key} must be at least 1, got {getattr(args, key)}")
    lo = 0 if args.min_timestep is None else args.min_timestep
    hi = 1000 if args.max_timestep is None else args.max_timestep
    if not 0 <= lo < hi <= 1000:
        raise UsageError(f"timesteps: need 0 <= min_timestep < max_timestep <= 1000, got {lo}, {hi}")
    if args.lr_scheduler not in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"):
        raise UsageError(f"lr_scheduler={args.lr_scheduler!r} is not supported; use constant, constant_with_warmup, linear, cosine, cosine_with_restarts or polynomial")
    if args.sample_sampler not in SAMPLERS:
        raise UsageError(f"sample_sampler={args.sample_sampler!r} is not supported; use one of {', '.join(SAMPLERS)}")
    check_optimizer(args)
    # network_args: parsed by the network module itself, so its own message names a bad key
    from networks.tlora_format import TLoRAFormatError, parse_network_args

    try:
        network_kwargs = parse_key_values(args.network_args, "network_args")
        parse_network_args(args.network_dim, args.network_alpha, network_kwargs)
    except TLoRAFormatError as e:
        raise UsageError(str(e)) from None
    if args.network_weights and not os.path.isfile(args.network_weights):
        raise UsageError(f"network_weights {args.network_weights} not found")
    info = inspect_model(args.pretrained_model_name_or_path)
    wanted = expected_families(args)
    if wanted and info.family != "unknown" and info.family not in wanted:
        names = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
        raise UsageError(
            f"this configuration is for {' / '.join(names[w] for w in wanted)} (metadata_tags={args.metadata_tags!r}) but "
            f"{args.pretrained_model_name_or_path} is an {names[info.family]} model: use the matching preset "
            f"(e.g. *-sd15.toml for SD 1.5, *-sdxl.toml for SDXL) or another base model"
        )
    samples = collect_samples(args.train_data_dir, args.caption_extension, args.instance_prompt)
    check_images(samples)
    prompts = read_prompts(args.sample_prompts) if args.sample_prompts else []
    if args.sample_every_n_steps and not prompts:
        raise UsageError("sample_every_n_steps needs --sample_prompts (a text file with one prompt a line)")
    resume = None
    if args.resume:
        resume = find_latest_state(args.output_dir, args.output_name) if args.resume == "latest" else args.resume
        if resume is None:
            raise UsageError(f"--resume latest: no {args.output_name}-stepNNNNNNNN-state folder in {args.output_dir}")
        if not os.path.isfile(os.path.join(resume, "training_state.pt")):
            raise UsageError(f"--resume {args.resume}: {resume} is not a train_tlora state folder (no training_state.pt)")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"output_dir {args.output_dir} exists and is not a folder")
    return resolution, info, samples, prompts, resume


# ============================================================================ training


def weights_digest(network) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(network.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


@dataclasses.dataclass
class TrainResult:
    output: Optional[str]
    step: int
    digest: str
    outputs: List[str]
    network: object = None


def train(args, resolution, info, samples, prompts, resume_dir) -> TrainResult:
    import numpy as np
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm

    import networks.tlora as tlora

    seed = 42 if args.seed is None else args.seed
    args.seed = seed
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=_cpu_only_launch())
    rank, world = accelerator.process_index, accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched != world:  # every process would train alone and write the same files
        raise UsageError(
            f"the launcher started {launched} processes but accelerate set up {world}; on a machine without GPUs "
            f"use `accelerate launch --multi_gpu --num_processes N` (gloo), or start one process"
        )
    device = accelerator.device
    main_process = accelerator.is_main_process
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    width, height = resolution

    if info.kind == "random" and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the tiny models' ops are too small to gain from threads; spinning threads cost more
    set_seed(seed)  # identical network init on every rank (DDP also broadcasts it)
    tokenizers, text_encoders, vae, unet, noise_scheduler = load_base_model(args.pretrained_model_name_or_path, info, seed)
    family = detect_family(text_encoders, unet)
    if args.v_parameterization:
        noise_scheduler.register_to_config(prediction_type="v_prediction")
    for model in (vae, unet, *text_encoders):
        model.requires_grad_(False)
        model.eval()
    train_text_encoder = not args.network_train_unet_only
    train_unet = not args.network_train_text_encoder_only
    vae.to(device, dtype=torch.float32)
    unet.to(device, dtype=weight_dtype)
    for te in text_encoders:
        te.to(device, dtype=weight_dtype)
    if args.xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as e:  # noqa: BLE001
            logger.warning("xformers is not available (%s); using PyTorch SDPA attention", e)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in training mode in some versions; no dropout in SD U-Nets
        if train_text_encoder:
            for te in text_encoders:
                te.gradient_checkpointing_enable()
                te.train()

    # ------------------------------------------------------------ network
    network_kwargs = parse_key_values(args.network_args, "network_args")
    network = tlora.create_network(
        1.0, args.network_dim, args.network_alpha, vae, text_encoders if train_text_encoder else None, unet,
        neuron_dropout=args.network_dropout, **network_kwargs,
    )
    network.apply_to(text_encoders, unet, apply_text_encoder=train_text_encoder, apply_unet=train_unet)
    if args.network_weights:
        network.load_weights(args.network_weights)
        logger.info("loaded network weights from %s", args.network_weights)
    if not network.loras:
        raise UsageError("the network adapts no layer of this model (check targets / network_train_* options)")
    te_lr = args.text_encoder_lr
    if isinstance(te_lr, list) and len(te_lr) == 1:
        te_lr = te_lr[0]
    groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs(te_lr, args.unet_lr, args.learning_rate)
    optimizer = build_optimizer(args, groups)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps)
    network.prepare_grad_etc(text_encoders, unet)

    # ------------------------------------------------------------ data (latents and, if frozen, text cached)
    conditioner = Conditioner(family, tokenizers, text_encoders, args.clip_skip, width, height)
    cache_generator = torch.Generator().manual_seed(seed)
    latents_cache = []
    with torch.no_grad():
        for sample in samples:
            pixels = load_image_tensor(sample.path, width, height)[None].to(device, torch.float32)
            dist = vae.encode(pixels).latent_dist
            noise = torch.randn(dist.mean.shape, generator=cache_generator).to(device)
            latents = (dist.mean + dist.std * noise) * vae.config.scaling_factor
            latents_cache.append(latents[0].to(weight_dtype))
    order = [i for i, s in enumerate(samples) for _ in range(s.repeats)]
    captions = sorted({s.caption for s in samples})
    ids_cache = {c: [ids[0] for ids in conditioner.tokenize([c])] for c in captions}
    text_cache = {}
    if not train_text_encoder:
        with torch.no_grad():
            for caption in captions:
                hidden, added = conditioner.encode([ids[None] for ids in ids_cache[caption]], device)
                text_cache[caption] = (hidden, added)

    TrainingModule = _training_module_class()
    model = TrainingModule(network, unet, conditioner, train_text_encoder)
    model, optimizer = accelerator.prepare(model, optimizer)

    noise_generator = torch.Generator().manual_seed(seed * 7919 + rank + 1)
    start_step = 0
    if resume_dir:
        from networks.tlora_format import read_safetensors

        tensors, _ = read_safetensors(os.path.join(resume_dir, "network.safetensors"))
        network.check_state_dict(tensors, resume_dir)
        network.load_state_dict(tensors, strict=False)
        state = torch.load(os.path.join(resume_dir, "training_state.pt"), map_location="cpu", weights_only=False)
        if state.get("world_size", 1) != world:
            raise UsageError(f"--resume: {resume_dir} was saved by {state.get('world_size')} processes, this run has {world}")
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        rank_file = os.path.join(resume_dir, f"rng_rank{rank}.pt")
        set_rng_state(torch.load(rank_file, map_location="cpu", weights_only=False), noise_generator)
        start_step = int(state["step"])
        accelerator.print(f"resumed from {resume_dir} at step {start_step}")

    os.makedirs(args.output_dir, exist_ok=True)
    writer = None
    if args.logging_dir and main_process:
        try:
            from torch.utils.tensorboard import SummaryWriter

            run = (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S", time.localtime())
            writer = SummaryWriter(os.path.join(args.logging_dir, run))
        except ImportError:
            logger.warning("--logging_dir: TensorBoard logging needs the tensorboard package (pip install tensorboard); not logging")

    metadata_for = lambda step: build_metadata(args, family, resolution, step, samples)  # noqa: E731
    save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(args.save_precision)
    sample_dir = os.path.join(args.output_dir, "sample")
    written_samples: List[str] = []
    saved_states: List[str] = []

    def save_state(step):
        """Weights file plus a resumable state folder, each appearing atomically."""
        final = os.path.join(args.output_dir, state_dir_name(args.output_name, step))
        tmp = os.path.join(args.output_dir, f".{state_dir_name(args.output_name, step)}.tmp")
        if main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        accelerator.wait_for_everyone()
        torch.save(rng_state(noise_generator), os.path.join(tmp, f"rng_rank{rank}.pt"))
        accelerator.wait_for_everyone()
        if main_process:
            network.save_weights(os.path.join(tmp, "network.safetensors"), None, metadata_for(step))
            torch.save(
                {"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                 "world_size": world, "args": resolved_config(args)},
                os.path.join(tmp, "training_state.pt"),
            )
            _fsync_tree(tmp)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            network.save_weights(os.path.join(args.output_dir, f"{args.output_name}-step{step:08d}.safetensors"), save_dtype, metadata_for(step))
            for older in os.listdir(args.output_dir):  # keep only the newest resumable state
                m = re.match(re.escape(args.output_name) + r"-step(\d{8})-state$", older)
                if m and int(m.group(1)) < step:
                    shutil.rmtree(os.path.join(args.output_dir, older), ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def sample_images(step):
        if not prompts or not main_process:
            return
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = make_sampling_scheduler(args.sample_sampler, noise_scheduler)
        if family == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                             tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler)
        else:
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        images = []
        network.eval()
        vae.to(dtype=weight_dtype)  # the pipelines decode latents in the U-Net's dtype (SDXL's upcasts an fp16 VAE itself)
        # the training RNG must not notice sampling, or a resumed run would differ
        with torch.random.fork_rng(devices=[]), torch.no_grad(), accelerator.autocast():
            for index, spec in enumerate(prompts):
                generator = torch.Generator().manual_seed(spec.seed if spec.seed is not None else seed + index)
                # the U-Net's pre-hook sets the rank mask of every denoising step from its timestep
                result = pipe(spec.prompt, negative_prompt=spec.negative or None, width=spec.width or width,
                              height=spec.height or height, num_inference_steps=spec.steps, guidance_scale=spec.scale,
                              generator=generator, output_type="pil")
                images.append(result.images[0])
        vae.to(dtype=torch.float32)
        network.train()
        os.makedirs(sample_dir, exist_ok=True)
        path = os.path.join(sample_dir, f"{args.output_name}_{step:08d}.png")
        image_grid(images).save(path)
        written_samples.append(path)
        if writer is not None:
            writer.add_image("samples", np.asarray(image_grid(images)), step, dataformats="HWC")

    # ------------------------------------------------------------ loop
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total, batch = args.max_train_steps, args.train_batch_size
    lo = 0 if args.min_timestep is None else args.min_timestep
    hi = 1000 if args.max_timestep is None else args.max_timestep
    prediction_type = noise_scheduler.config.prediction_type
    accelerator.print(
        f"training {network.config.algo} rank {network.config.rank} on {len(samples)} image(s) ({len(order)} with repeats), "
        f"{family} model, {width}x{height}, {world} process(es) x batch {batch}, steps {start_step}->{total}; "
        f"groups: {', '.join(descriptions)}"
    )
    if args.sample_at_first and start_step == 0:
        sample_images(0)
    network.train()
    bar = tqdm(total=total, initial=start_step, disable=not main_process, desc="steps", dynamic_ncols=True)
    last_state = find_latest_state(args.output_dir, args.output_name) if resume_dir else None
    recent = []
    first_loss = None
    step = start_step
    while step < total:
        indices = [order[sample_index((step * world + rank) * batch + j, len(order), seed)] for j in range(batch)]
        latents = torch.stack([latents_cache[i] for i in indices]).to(device)
        noise = torch.randn(latents.shape, generator=noise_generator).to(device, latents.dtype)
        if args.noise_offset:
            noise = noise + args.noise_offset * torch.randn((batch, latents.shape[1], 1, 1), generator=noise_generator).to(device, latents.dtype)
        timesteps = torch.randint(lo, hi, (batch,), generator=noise_generator).to(device)
        noisy = noise_scheduler.add_noise(latents.float(), noise.float(), timesteps).to(weight_dtype)
        if prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents.float(), noise.float(), timesteps)
        else:
            target = noise
        caps = [samples[i].caption for i in indices]
        input_ids = [torch.stack([ids_cache[c][k] for c in caps]) for k in range(len(tokenizers))]
        cached_hidden = cached_added = None
        if not train_text_encoder:
            cached_hidden = torch.cat([text_cache[c][0] for c in caps])
            if text_cache[caps[0]][1] is not None:
                cached_added = {k: torch.cat([text_cache[c][1][k] for c in caps]) for k in text_cache[caps[0]][1]}
        with accelerator.autocast():
            prediction = model(noisy, timesteps, input_ids, cached_hidden, cached_added)
        loss = compute_loss(prediction, target)
        finite = torch.isfinite(loss.detach()).float().reshape(1).to(device)
        if world > 1:
            finite = accelerator.reduce(finite, reduction="sum") / world  # every rank stops together
        if finite.item() < 1:
            raise NonFiniteLoss(
                f"the loss is not finite (NaN/inf: {loss.item()}) at step {step + 1}; training stopped and the weights of this step were not "
                f"applied or saved. The last good checkpoint is "
                f"{last_state or 'none (no --save_every_n_steps checkpoint was written yet)'}. Lower the learning rate, "
                f"use bf16 instead of fp16, or check the data; resume with --resume latest"
            )
        accelerator.backward(loss)
        if args.max_grad_norm and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        value = loss.item()
        first_loss = value if first_loss is None else first_loss
        recent = (recent + [value])[-20:]
        bar.update(1)
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        if writer is not None:
            writer.add_scalar("loss/current", value, step)
            writer.add_scalar("lr/unet", lr_scheduler.get_last_lr()[-1], step)
        if args.save_every_n_steps and step % args.save_every_n_steps == 0 and step < total:
            last_state = save_state(step)
            saved_states.append(last_state)
        if args.sample_every_n_steps and step % args.sample_every_n_steps == 0:
            sample_images(step)
        after_step_hook(step)
    bar.close()

    # ------------------------------------------------------------ outputs
    digest = weights_digest(network)
    if world > 1:
        digests = gather_object([digest])
        losses = gather_object([first_loss])
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP ranks diverged: weight digests {digests}")
        accelerator.print(f"DDP check: {world} ranks hold identical weights (sha256 {digest}); first losses per rank {losses}")
    outputs: List[str] = []
    native = os.path.join(args.output_dir, f"{args.output_name}.safetensors")
    if main_process:
        network.save_weights(native, save_dtype, metadata_for(step))
        outputs.append(native)
        try:
            outputs += convert_outputs(native, args, family, unet)
        except Exception as e:  # noqa: BLE001 - the native file is written; report and go on
            logger.error("conversion failed (%s); the native file %s is complete", e, native)
        config_path = os.path.join(args.output_dir, f"{args.output_name}.toml")
        import toml

        write_text_atomic(config_path, "# resolved configuration of this run (sd-scripts flat keys)\n" + toml.dumps(resolved_config(args)))
        outputs.append(config_path)
        if writer is not None:
            writer.close()
        lines = ["", "finished: outputs are"]
        lines.append(f"  network (networks.tlora, timestep-aware): {native}")
        lines += [f"  converted: {o}" for o in outputs[1:-1]]
        lines.append(f"  resolved config: {config_path}")
        if written_samples:
            lines.append(f"  sample grids: {sample_dir} (last: {os.path.basename(written_samples[-1])})")
        if saved_states:
            lines.append(f"  checkpoints: {args.output_dir}/{args.output_name}-stepNNNNNNNN.safetensors (+ the newest -state folder)")
        if args.logging_dir and writer is not None:
            lines.append(f"  TensorBoard logs: {args.logging_dir}")
        if info.kind == "random":
            lines.append("  note: the base model has RANDOM weights (a demo of the pipeline); these files are not useful for images")
        accelerator.print("\n".join(lines))
    accelerator.wait_for_everyone()
    return TrainResult(native if main_process else None, step, digest, outputs, network)


def _cpu_only_launch() -> bool:
    """True for a multi-process launch on a machine without CUDA: newer accelerate releases (1.15 here) set up gloo
    DDP on CPUs only when asked for the CPU; 1.6 did it by itself."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and not torch.cuda.is_available()


def after_step_hook(step: int) -> None:
    """Called after every optimiser step (tests use it to interrupt a run)."""


# ============================================================================ entry point


def run(argv: Optional[Sequence[str]] = None) -> TrainResult:
    """Parse, validate (before any model loads), train. Raises UsageError / NonFiniteLoss."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    resolution, info, samples, prompts, resume = validate(args)
    return train(args, resolution, info, samples, prompts, resume)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (also the `tlora-train` console script); returns the exit code."""
    try:
        run(argv)
    except UsageError as e:
        print(f"train_tlora.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelLoadError as e:
        print(f"train_tlora.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as e:  # TLoRAFormatError and the network's own checks (e.g. a state of another network)
        from networks.tlora_format import TLoRAFormatError

        if not isinstance(e, TLoRAFormatError):
            raise
        print(f"train_tlora.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLoss as e:
        print(f"train_tlora.py: stopped: {e}", file=sys.stderr)
        return EXIT_NAN
    return 0


if __name__ == "__main__":
    sys.exit(main())
