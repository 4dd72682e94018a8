"""Base models: which family a model is (before loading it), loading it without downloads, the
small random-weight models of the demo and the tests, and the text conditioning of each family."""

import dataclasses
import json
import os
from typing import List, Optional

import torch

from networks.tlora_families import FAMILIES, Family
from networks.tlora_families import family_of_model as _family_of_model

from .errors import ModelLoadError, UsageError, describe_os_error, is_os_failure
from .fileio import describe_path, read_text
from .options import RANDOM_PREFIX

# ----------------------------------------------------------------------------- families
# What a family is (names, metadata, how a loaded model is recognised) lives in
# networks/tlora_families.py; the trainer trains the U-Net families of it.

TRAINABLE_FAMILIES = ("sd1", "sd2", "sdxl")


def family_of_model(denoiser, text_encoders) -> Family:
    family = _family_of_model(denoiser, text_encoders)
    if family is None or family.name not in TRAINABLE_FAMILIES:
        raise ModelLoadError(
            f"the base model is {family.title if family else 'of no known family'}; train_tlora.py trains "
            f"{', '.join(FAMILIES[n].title for n in TRAINABLE_FAMILIES)} (use sd-scripts with --network_module networks.tlora for others)"
        )
    return family


# ----------------------------------------------------------------------------- before loading


@dataclasses.dataclass
class ModelInfo:
    family: str  # sd1 | sd2 | sdxl | unknown (a .ckpt, known only once loaded)
    kind: str  # random | diffusers | single_file


RANDOM_MODELS = {"sd1-tiny": "sd1", "sdxl-tiny": "sdxl"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def inspect_model(path: Optional[str]) -> ModelInfo:
    """The family of a base model from its config or file header, without loading weights."""
    if not path:
        raise UsageError("no base model: give --pretrained_model_name_or_path (a diffusers folder, a .safetensors/.ckpt file, or random:sd1-tiny)")
    if path.startswith(RANDOM_PREFIX):
        name = path[len(RANDOM_PREFIX):]
        if name not in RANDOM_MODELS:
            raise UsageError(f"{path}: unknown random model; use one of {', '.join(RANDOM_PREFIX + n for n in RANDOM_MODELS)}")
        return ModelInfo(RANDOM_MODELS[name], "random")
    kind = describe_path(path)
    if kind == "missing":
        raise UsageError(
            f"base model {path} not found. train_tlora.py never downloads: give a local diffusers folder or a "
            f"single-file checkpoint (or random:sd1-tiny for a random-weight test model)"
        )
    if kind == "a folder":
        return ModelInfo(_diffusers_folder_family(path), "diffusers")
    if kind != "a file":
        raise UsageError(f"base model {path} is {kind}, not a diffusers folder or a checkpoint file")
    if not path.endswith(SINGLE_FILE_SUFFIXES):
        raise UsageError(f"base model {path}: a single-file checkpoint must be .safetensors or .ckpt")
    if not path.endswith(".safetensors"):
        return ModelInfo("unknown", "single_file")
    return ModelInfo(_checkpoint_family(path), "single_file")


def _read_json(path: str, what: str) -> dict:
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}); the model folder is damaged") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what} {path} does not hold a JSON object; the model folder is damaged")
    return value


def _diffusers_folder_family(path: str) -> str:
    index = os.path.join(path, "model_index.json")
    unet_config = os.path.join(path, "unet", "config.json")
    if not os.path.lexists(index) or not os.path.lexists(unet_config):
        raise UsageError(f"{path} is a folder but not a diffusers model (no model_index.json and unet/config.json)")
    class_name = str(_read_json(index, "model index").get("_class_name", ""))
    unet = _read_json(unet_config, "U-Net config")
    if "XL" in class_name or unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"


def _checkpoint_family(path: str) -> str:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - any header problem means an unusable file
        if is_os_failure(e):
            raise UsageError(f"base model {describe_os_error(e, path, 'read it')}") from None
        raise UsageError(f"base model {path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer") for k in keys):
        return "sd1"
    raise UsageError(f"{path} does not look like an SD 1.x / 2.x / SDXL checkpoint (no known text encoder keys)")


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class BaseModel:
    tokenizers: list
    text_encoders: list
    vae: object
    unet: object
    noise_scheduler: object


def build_random_model(name: str, seed: int) -> BaseModel:
    """Small random-weight models with the SD 1.x / SDXL module layouts (diffusers classes).

    Attention sits at the 64-channel level only, so every layer allows rank 64 (the presets' rank)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizers import clip_tokenizer

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    tokenizers = [clip_tokenizer()]

    def clip(hidden, projection=False):
        tok = tokenizers[0]
        config = CLIPTextConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=len(tok), max_position_embeddings=77, projection_dim=hidden,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    sdxl = RANDOM_MODELS[name] == "sdxl"
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), sample_size=128, scaling_factor=0.13025 if sdxl else 0.18215,
    )
    unet_layout = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )
    if sdxl:
        text_encoders = [clip(64), clip(64, projection=True)]
        unet = UNet2DConditionModel(
            **unet_layout, cross_attention_dim=128, attention_head_dim=(4, 8), transformer_layers_per_block=(1, 2),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=64 + 6 * 8,
        )
        tokenizers.append(clip_tokenizer())
    else:
        text_encoders = [clip(64)]
        unet = UNet2DConditionModel(**unet_layout, cross_attention_dim=64, attention_head_dim=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, steps_offset=1)
    torch.random.set_rng_state(generator_state)
    return BaseModel(tokenizers, text_encoders, vae, unet, scheduler)


def load_base_model(path: str, info: ModelInfo, seed: int) -> BaseModel:
    """The model's parts; never downloads."""
    if info.kind == "random":
        return build_random_model(path[len(RANDOM_PREFIX):], seed)
    try:
        if info.kind == "diffusers":
            return _load_diffusers_folder(path, info.family)
        return _load_single_file(path, info.family)
    except (UsageError, ModelLoadError):
        raise
    except Exception as e:  # noqa: BLE001 - diffusers and transformers raise many kinds here
        if is_os_failure(e) and getattr(e, "filename", None):
            raise ModelLoadError(f"base model {describe_os_error(e, None, 'read it')}") from None
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        if info.kind == "diffusers":
            raise ModelLoadError(
                f"the diffusers model folder {path} could not be loaded ({type(e).__name__}: {first_line}); "
                f"a file in it is missing or damaged: save the model again (pipe.save_pretrained) or copy it anew"
            ) from None
        raise ModelLoadError(
            f"diffusers could not read the single-file checkpoint {path} without downloading ({type(e).__name__}: {first_line}). "
            f"from_single_file needs the model's config files in the Hugging Face cache; convert the checkpoint to a "
            f"diffusers folder once on a machine with access, or pass such a folder"
        ) from None


def _load_diffusers_folder(path: str, family: str) -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = dict(local_files_only=True)
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)]
    text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)]
    if family == "sdxl":
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw))
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    return BaseModel(tokenizers, text_encoders, vae, unet, scheduler)


def _load_single_file(path: str, family: str) -> BaseModel:
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(path, local_files_only=True)
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    return BaseModel(tokenizers, text_encoders, pipe.vae, pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config))


# ----------------------------------------------------------------------------- conditioning


class Conditioner:
    """Text conditioning of SD 1.x/2.x (one CLIP) and SDXL (two CLIPs, pooled, time ids)."""

    def __init__(self, family: Family, tokenizers, text_encoders, clip_skip, width, height):
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
        if self.family.name != "sdxl":
            te = self.text_encoders[0]
            if self.clip_skip is None or self.clip_skip <= 1:
                return te(input_ids[0].to(device))[0], None
            out = te(input_ids[0].to(device), output_hidden_states=True)
            return te.text_model.final_layer_norm(out.hidden_states[-self.clip_skip]), None
        states = []
        pooled = None
        for te, ids in zip(self.text_encoders, input_ids):
            out = te(ids.to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        hidden = torch.cat(states, dim=-1)
        time_ids = torch.tensor([[self.height, self.width, 0, 0, self.height, self.width]], dtype=hidden.dtype, device=device)
        return hidden, {"text_embeds": pooled, "time_ids": time_ids.repeat(hidden.shape[0], 1)}
