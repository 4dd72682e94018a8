"""Reading any LoRA file into per-layer factors, and turning them into standard LoRA factors
(exactly, or compressed by SVD).

The layer math (rank schedule, masks, the change in weight space) is networks.tlora's own
(`networks.tlora_layer.LayerFactors`); the file checks are networks.tlora's own
(`networks.tlora_format.validate_native`); what a model family looks like is
`networks.tlora_families`. This module adds only what converting needs: factorisations."""

import dataclasses
import json
import math
import os
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from networks.tlora_families import (
    FAMILIES,
    Family,
    families_of_layers,
    get_family,
    is_denoiser_layer,
    split_prefix,
)
from networks.tlora_format import (
    METADATA_CHECKSUM_KEY,
    METADATA_CONFIG_KEY,
    NetworkConfig,
    TLoRAFormatError,
    content_digest,
    read_safetensors,
    validate_native,
)
from networks.tlora_layer import LayerFactors, dense_delta, parse_mask_mode


class ConversionError(ValueError):
    """A file or option the converters cannot use; the message says what to do."""


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# relative Frobenius error of a change allowed for rounding the factors to the output dtype
DTYPE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in DTYPE_TOLERANCE:
            raise ConversionError(f"dtype {dtype} is not supported; use fp16, bf16 or fp32")
        return dtype
    key = str(dtype).strip().lower()
    if key not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is unknown; use fp16, bf16 or fp32")
    return DTYPES[key]


def parse_mask(mask) -> str:
    """A converter's --mask: full (default), mean or t=<int>. A standard LoRA file cannot follow
    the timestep, so "timestep" is not a choice here."""
    try:
        mode = parse_mask_mode("full" if mask is None else mask)
    except ValueError as e:
        raise ConversionError(f"--mask: {e}") from None
    if mode is None:
        raise ConversionError("--mask timestep: a standard LoRA file cannot follow the timestep; use full, mean or t=<int> "
                              "(or sample the native file timestep-aware: converters.diffusers.apply_tlora)")
    return mode


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class LoadedLora:
    path: str
    kind: str  # "native" | "kohya" | "diffusers"
    algo: str
    config: Optional[NetworkConfig]
    layers: Dict[str, LayerFactors]
    metadata: Dict[str, str]
    dtypes: List[str]
    size: int
    families: Tuple[Family, ...]  # the families the file can be for, most likely first

    @property
    def masked(self) -> bool:
        return any(layer.masked for layer in self.layers.values())

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps if self.config is not None else 1000


def _is_diffusers_key(key: str) -> bool:
    return key.split(".", 1)[0] in ("unet", "transformer", "text_encoder", "text_encoder_2") and (".lora_A." in key or ".lora_B." in key)


def load_lora(path: str) -> LoadedLora:
    """Any LoRA file this project knows: native (tlora_config metadata), plain kohya, diffusers/PEFT.
    Native and kohya files pass networks.tlora's own validation (validate_native)."""
    try:
        tensors, metadata = read_safetensors(path)
    except TLoRAFormatError as e:
        raise ConversionError(str(e)) from None
    if not tensors:
        raise ConversionError(f"{path}: the file holds no tensors; it is not a LoRA")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    size = os.path.getsize(path)
    if all(_is_diffusers_key(k) for k in tensors):
        stored = metadata.get(METADATA_CHECKSUM_KEY)
        if stored is not None and stored != content_digest(tensors, metadata):
            raise ConversionError(f"{path}: the content does not match its checksum ({METADATA_CHECKSUM_KEY}): the file was damaged "
                                  f"or edited after it was written; use an intact copy")
        layers = _layers_from_diffusers(tensors, metadata, path)
        shapes = {name: tuple(layer.down.shape) for name, layer in layers.items()}
        return LoadedLora(path, "diffusers", "lora", None, layers, metadata, dtypes, size,
                          families_of_layers(layers, shapes, metadata))
    hint = _foreign_format_hint(tensors)
    if hint:
        raise ConversionError(f"{path}: {hint}")
    try:
        config, algo, grouped = validate_native(tensors, metadata, path)
    except TLoRAFormatError as e:
        message = str(e)
        if "svd_* factors without" in message:
            message += "; e.g. `tlora-convert import-official` for official T-LoRA files"
        raise ConversionError(message) from None
    layers = {}
    for name, layer_tensors in grouped.items():
        masked = config is not None and is_denoiser_layer(name)
        down = layer_tensors["svd_down.weight" if "svd_down.weight" in layer_tensors else "lora_down.weight"]
        min_rank = None
        if config is not None:
            kxk = down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
            min_rank = config.layer_settings(kxk)[2]
        layers[name] = LayerFactors.from_tensors(
            name, layer_tensors, algo, masked=masked, min_rank=min_rank,
            power=config.rank_schedule_power if config else 1.0, num_train_timesteps=config.num_train_timesteps if config else 1000,
        )
    shapes = {name: tuple(layer.down.shape) for name, layer in layers.items()}
    families = families_of_layers(layers, shapes, metadata)
    if config is not None and config.family is not None:
        stored = get_family(config.family)
        families = (stored,) + tuple(f for f in families if f is not stored)
    return LoadedLora(path, "native" if config is not None else "kohya", algo, config, layers, metadata, dtypes, size, families)


def _foreign_format_hint(tensors) -> Optional[str]:
    keys = list(tensors)
    if any(".processor." in k and "_lora." in k for k in keys):
        return "this is an official T-LoRA checkpoint (attention-processor keys); bring it in with `tlora-convert import-official`"
    if any(k.endswith((".q_layer.weight", ".lambda_layer")) for k in keys):
        return "this is a LyCORIS algo=tlora file; bring it in with `tlora-convert import-lycoris --base-model DIR`"
    return None


def _layers_from_diffusers(tensors, metadata, path) -> Dict[str, LayerFactors]:
    """diffusers/PEFT keys ('unet.<path>.lora_A.weight', 'transformer.<path>...', 'text_encoder...')
    as kohya-named layers (the diffusers layout of the family: lora_unet_ / lora_transformer_)."""
    two_te = any(k.startswith("text_encoder_2.") for k in tensors)
    adapter = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            raise ConversionError(f"{path}: metadata 'lora_adapter_metadata' is not valid JSON") from None
        if isinstance(meta, dict):
            adapter = meta
    layers = {}
    for key in tensors:
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in tensors:
            raise ConversionError(f"{path}: {key} has no matching {b_key}")
        component, _, module_path = module.partition(".")
        prefix = {"unet": "lora_unet", "transformer": "lora_transformer", "text_encoder": "lora_te1" if two_te else "lora_te",
                  "text_encoder_2": "lora_te2"}[component]
        name = f"{prefix}_{module_path}".replace(".", "_")
        down, up = tensors[key], tensors[b_key]
        for tensor_key, tensor in ((key, down), (b_key, up)):
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                raise ConversionError(f"{path}: {tensor_key} is not a finite floating-point tensor")
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise ConversionError(f"{path}: {key} {tuple(down.shape)} and {b_key} {tuple(up.shape)} are not LoRA factors")
        rank = int(down.shape[0])
        layers[name] = LayerFactors(name, down, up, _peft_alpha(adapter, component, module_path, rank))
    if not layers:
        raise ConversionError(f"{path}: no lora_A/lora_B pairs found")
    return layers


def _peft_alpha(meta: Mapping, component: str, module: str, rank: int) -> float:
    alpha_pattern = meta.get(f"{component}.alpha_pattern") or {}
    if isinstance(alpha_pattern, dict):
        for pattern, value in alpha_pattern.items():
            if module == pattern or module.endswith("." + pattern):
                return float(value)
    value = meta.get(f"{component}.lora_alpha")
    r = meta.get(f"{component}.r")
    if isinstance(value, (int, float)) and isinstance(r, (int, float)) and r > 0:
        return float(value) / float(r) * rank  # same scale lora_alpha/r for this module
    return float(rank)


def resolve_family(loaded: LoadedLora, base: Optional[str]) -> Family:
    """The family to convert for: --base if given and the file does not contradict it, else the
    most likely one."""
    if base is None:
        return loaded.families[0]
    if base not in FAMILIES:
        raise ConversionError(f"--base {base!r} is unknown; use one of {', '.join(FAMILIES)}")
    family = FAMILIES[base]
    if family not in loaded.families:
        raise ConversionError(
            f"--base {base}: {loaded.path} is a {' or '.join(f.title for f in loaded.families)} LoRA (from its layer names, "
            f"shapes and metadata), not {family.title}; drop --base or give the file of the right model"
        )
    return family


def layer_is_denoiser(name: str) -> bool:
    try:
        prefix, _ = split_prefix(name)
    except ValueError:
        return False
    return prefix in ("lora_unet", "lora_transformer")


# ----------------------------------------------------------------------------- conversion


@dataclasses.dataclass
class Converted:
    """Standard LoRA factors of one layer: change = (alpha/rank) · up @ down."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    predicted_error: float = 0.0  # relative error expected from SVD truncation

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def dense(self) -> torch.Tensor:
        return dense_delta(self.down.double(), self.up.double(), None) * (self.alpha / self.rank)


def factored_svd(up: torch.Tensor, down: torch.Tensor):
    """SVD (u, s, vh) of up @ down without forming it: thin QR of both factors, then the SVD of
    the small k x k core. O((out + in)·k²) instead of O(out·in·min(out, in)), and exact."""
    if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
        raise ConversionError("non-finite factors reached the SVD (the file holds NaN or infinite values)")
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u_core, s, vh_core @ q_down.T


def _shaped(layer: LayerFactors, up: torch.Tensor, down: torch.Tensor, k: int):
    down_shape = (k, *layer.weight_shape[1:])
    up_shape = (layer.weight_shape[0], k, 1, 1) if len(layer.weight_shape) == 4 else (layer.weight_shape[0], k)
    return up.reshape(up_shape), down.reshape(down_shape)


def exact_factors(layer: LayerFactors, mask_mode: str) -> Converted:
    """The same change as a plain LoRA: rank R (2R for the Ortho forms), columns whose mask is 0
    dropped. Here alpha = alpha/R · new rank (same scale); the writers then fold the scale into
    the factors.

    The Ortho forms are re-factorised (factored_svd) instead of written as [P·c, −P0·c0]/[Q; Q0]:
    early in training P·c·Q and P0·c0·Q0 nearly cancel, and a loader that multiplies those
    factors in fp16/fp32 would lose the small difference to rounding."""
    up, down = layer.factor_stack(layer.mask_vector(mask_mode))
    k = int(down.shape[0])
    if layer.up0 is not None:
        u, s, vh = factored_svd(up, down)
        root = s.sqrt()
        up, down = u * root[None, :], root[:, None] * vh
        k = int(s.numel())  # min(2R, out, in): the change has no higher rank
    up, down = _shaped(layer, up, down, k)
    return Converted(layer.name, down, up, layer.scale * k)


def svd_factors(layer: LayerFactors, mask_mode: str, rank: Optional[int], keep_energy: Optional[float]) -> Converted:
    """Rank-k truncation of the change (k = --rank, or the smallest k keeping `keep_energy` of
    Σσ², capped by --rank). up = U√S, down = √S Vh; alpha = alpha/R · k (same scale)."""
    u, s, vh = factored_svd(*layer.factor_stack(layer.mask_vector(mask_mode)))
    energy = s.pow(2)
    total = float(energy.sum())
    k = s.numel() if rank is None else min(int(rank), s.numel())
    if keep_energy is not None and total > 0:
        cumulative = torch.cumsum(energy, 0) / total
        k_energy = int(torch.searchsorted(cumulative, torch.tensor(float(keep_energy), dtype=cumulative.dtype) - 1e-12).item()) + 1
        k = min(k, max(1, k_energy))
    k = max(1, k)
    root = s[:k].sqrt()
    up = u[:, :k] * root[None, :]
    down = root[:, None] * vh[:k]
    discarded = float(energy[k:].sum())
    predicted = math.sqrt(discarded / total) if total > 0 else 0.0
    up, down = _shaped(layer, up, down, k)
    return Converted(layer.name, down, up, layer.scale * k, predicted)


def relative_error(converted: torch.Tensor, reference: torch.Tensor) -> float:
    ref_norm = float(reference.double().norm())
    err = float((converted.double() - reference.double()).norm())
    if not math.isfinite(err):
        return float("inf")
    return err / ref_norm if ref_norm > 0 else err


__all__ = [
    "ConversionError", "LoadedLora", "load_lora", "Converted", "exact_factors", "svd_factors", "factored_svd", "relative_error",
    "parse_dtype", "parse_mask", "resolve_family", "METADATA_CONFIG_KEY", "DTYPE_NAMES", "DTYPE_TOLERANCE", "layer_is_denoiser",
]
