"""Reading any LoRA file into per-layer factors, and turning native T-LoRA / Ortho-LoRA / TriLoRA
layers into standard LoRA factors (exactly, or compressed by SVD).

The layer math (rank schedule, masks, dense change) is networks.tlora's own: this module calls
networks.tlora_layer.{active_rank_count, rank_mask, mean_rank_mask, dense_delta}."""

import dataclasses
import json
import math
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from networks.tlora_format import (
    ALGOS,
    METADATA_CONFIG_KEY,
    METADATA_VERSION_KEY,
    NetworkConfig,
    TLoRAFormatError,
    config_from_metadata,
    detect_algo,
    group_by_layer,
    read_safetensors,
    validate_layer_tensors,
)
from networks.tlora_layer import active_rank_count, dense_delta, mean_rank_mask, rank_mask

from . import naming


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


# ----------------------------------------------------------------------------- masks


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which time-independent rank mask to bake in: all ranks, the mean over t, or one t."""

    kind: str  # "full" | "mean" | "t"
    t: Optional[int] = None

    @classmethod
    def parse(cls, text) -> "MaskSpec":
        if isinstance(text, MaskSpec):
            return text
        raw = "full" if text is None else str(text).strip().lower()
        if raw in ("full", "mean"):
            return cls(raw)
        m = re.fullmatch(r"t\s*=\s*(\d+)", raw)
        if m:
            return cls("t", int(m.group(1)))
        raise ConversionError(f"--mask {text!r} is unknown; use full, mean or t=<0..999> (e.g. t=500)")

    def __str__(self):
        return f"t={self.t}" if self.kind == "t" else self.kind

    def vector(self, rank: int, min_rank: int, power: float, num_train_timesteps: int) -> torch.Tensor:
        """The mask vector [R] (float64) for a layer of this rank schedule."""
        if self.kind == "full":
            return torch.ones(rank, dtype=torch.float64)
        if self.kind == "mean":
            return mean_rank_mask(rank, min_rank, power, num_train_timesteps).to(torch.float64)
        if not 0 <= self.t < num_train_timesteps:
            raise ConversionError(f"--mask t={self.t} is outside 0..{num_train_timesteps - 1}")
        counts = active_rank_count(torch.tensor([self.t]), rank, min_rank, power, num_train_timesteps)
        return rank_mask(counts, rank, torch.float64)[0]


# ----------------------------------------------------------------------------- layers


@dataclasses.dataclass
class Layer:
    """One adapted layer: change = alpha/R · ( up·diag(c ⊙ m)·down − up0·diag(c0 ⊙ m)·down0 ),
    c = λ (ones when None); the base term exists for the Ortho forms only; m is applied only when
    `masked`."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    lam: Optional[torch.Tensor] = None
    down0: Optional[torch.Tensor] = None
    up0: Optional[torch.Tensor] = None
    lam0: Optional[torch.Tensor] = None
    masked: bool = False
    min_rank: int = 0
    power: float = 1.0
    num_train_timesteps: int = 1000

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (int(self.up.shape[0]), *self.down.shape[1:])

    @property
    def is_unet(self) -> bool:
        return self.name.startswith(naming.UNET_PREFIX)

    def mask_vector(self, mask: MaskSpec) -> Optional[torch.Tensor]:
        if not self.masked or mask.kind == "full":
            return None
        return mask.vector(self.rank, self.min_rank, self.power, self.num_train_timesteps)

    def coefficients(self, mask: MaskSpec):
        """(c ⊙ m, c0 ⊙ m) in float64, either None when absent (c = λ or ones)."""
        m = self.mask_vector(mask)
        c = None if self.lam is None else self.lam.double()
        if m is not None:
            c = m if c is None else c * m
        c0 = None
        if self.up0 is not None:
            c0 = self.lam0.double() if self.lam0 is not None else torch.ones(self.rank, dtype=torch.float64)
            if m is not None:
                c0 = c0 * m
        return c, c0

    def native_delta(self, mask: MaskSpec) -> torch.Tensor:
        """The change at a fixed mask, float64, including alpha/R, computed by networks' dense_delta.
        float64 because the Ortho forms subtract two nearly equal products early in training."""
        c, c0 = self.coefficients(mask)
        change = dense_delta(self.down.double(), self.up.double(), c)
        if self.up0 is not None:
            change = change - dense_delta(self.down0.double(), self.up0.double(), c0)
        return change * self.scale

    def factor_stack(self, mask: MaskSpec) -> Tuple[torch.Tensor, torch.Tensor]:
        """(up [out, k], down [k, fan_in]) in float64 with up @ down = the unscaled change:
        k = R, or 2R for the Ortho forms ([P·c, −P0·c0] and [Q; Q0]); masked-off ranks dropped."""
        c, c0 = self.coefficients(mask)
        m = self.mask_vector(mask)
        keep = torch.ones(self.rank, dtype=torch.bool) if m is None else m != 0
        if not bool(keep.any()):
            keep[0] = True  # a rank-0 LoRA is not a file format; one zero column is exact
        ones = torch.ones(self.rank, dtype=torch.float64)
        ups = [_scale_columns(self.up, c if c is not None else ones).reshape(self.up.shape[0], -1)[:, keep]]
        downs = [self.down.double().reshape(self.rank, -1)[keep]]
        if self.up0 is not None:
            ups.append(-_scale_columns(self.up0, c0).reshape(self.up0.shape[0], -1)[:, keep])
            downs.append(self.down0.double().reshape(self.rank, -1)[keep])
        return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


@dataclasses.dataclass
class LoadedLora:
    path: str
    kind: str  # "native" | "kohya" | "diffusers"
    algo: str
    config: Optional[NetworkConfig]
    layers: Dict[str, Layer]
    metadata: Dict[str, str]
    dtypes: List[str]
    size: int


def _is_diffusers_key(key: str) -> bool:
    return key.split(".", 1)[0] in ("unet", "text_encoder", "text_encoder_2") and (".lora_A." in key or ".lora_B." in key)


def load_lora(path: str) -> LoadedLora:
    """Any LoRA file this project knows: native (tlora_config metadata), plain kohya, diffusers/PEFT."""
    try:
        tensors, metadata = read_safetensors(path)
    except FileNotFoundError as e:
        raise ConversionError(str(e)) from None
    except TLoRAFormatError as e:
        raise ConversionError(str(e)) from None
    if not tensors:
        raise ConversionError(f"{path}: the file holds no tensors; it is not a LoRA")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    size = os.path.getsize(path)
    if all(_is_diffusers_key(k) for k in tensors):
        layers = _layers_from_diffusers(tensors, metadata, path)
        return LoadedLora(path, "diffusers", "lora", None, layers, metadata, dtypes, size)
    hint = _foreign_format_hint(tensors)
    if hint:
        raise ConversionError(f"{path}: {hint}")
    try:
        config = config_from_metadata(metadata, path)
        grouped = group_by_layer(tensors)
    except TLoRAFormatError as e:
        raise ConversionError(f"{e}") from None
    if config is None:
        families = {detect_algo(keys) for keys in grouped.values()}
        if families != {"lora"}:
            raise ConversionError(
                f"{path}: svd_* factors without '{METADATA_CONFIG_KEY}' metadata; the algo and min_rank are unknown. "
                f"Bring it in with `python -m converters import-official` / `import-lycoris` first"
            )
        config = None
        algo = "lora"
    else:
        algo = config.algo
    layers = {}
    for name, layer_tensors in grouped.items():
        try:
            naming.split_prefix(name)
            validate_layer_tensors(name, layer_tensors, algo)
        except (TLoRAFormatError, ValueError) as e:
            raise ConversionError(f"{path}: {e}") from None
        layers[name] = _layer_from_tensors(name, layer_tensors, algo, config)
    return LoadedLora(path, "native" if config is not None else "kohya", algo, config, layers, metadata, dtypes, size)


def _foreign_format_hint(tensors) -> Optional[str]:
    keys = list(tensors)
    if any(".processor." in k and "_lora." in k for k in keys):
        return "this is an official T-LoRA checkpoint (attention-processor keys); bring it in with `python -m converters import-official`"
    if any(k.endswith((".q_layer.weight", ".lambda_layer")) for k in keys):
        return "this is a LyCORIS algo=tlora file; bring it in with `python -m converters import-lycoris --base-model DIR`"
    return None


def _layer_from_tensors(name, t: Mapping[str, torch.Tensor], algo: str, config: Optional[NetworkConfig]) -> Layer:
    spec = ALGOS[algo]
    if spec.has_lambda:
        down, up, lam = t["svd_down.weight"], t["svd_up.weight"], t["svd_lambda"]
    else:
        down, up, lam = t["lora_down.weight"], t["lora_up.weight"], None
    rank = int(down.shape[0])
    alpha = float(t["alpha"].float().item()) if "alpha" in t else float(rank)
    if alpha == 0:  # kohya and networks.tlora: alpha 0 / missing means scale 1
        alpha = float(rank)
    layer = Layer(name, down, up, alpha, lam=lam)
    if spec.has_base:
        layer.down0, layer.up0, layer.lam0 = t["svd_down_base.weight"], t["svd_up_base.weight"], t["svd_lambda_base"]
    if config is not None and spec.masked and name.startswith(naming.UNET_PREFIX):
        is_kxk = down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
        _, _, min_rank = config.layer_settings(is_kxk)
        layer.masked = True
        layer.min_rank = min(rank if min_rank is None else min_rank, rank)
        layer.power = config.rank_schedule_power
        layer.num_train_timesteps = config.num_train_timesteps
    return layer


def _layers_from_diffusers(tensors, metadata, path) -> Dict[str, Layer]:
    two_te = any(k.startswith("text_encoder_2.") for k in tensors)
    alphas = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            meta = {}
        if isinstance(meta, dict):
            alphas = meta
    layers = {}
    for key in tensors:
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in tensors:
            raise ConversionError(f"{path}: {key} has no matching {b_key}")
        name = naming.diffusers_key_to_kohya(module)
        if not two_te:
            name = name.replace("lora_te1_", "lora_te_", 1)
        down, up = tensors[key], tensors[b_key]
        rank = int(down.shape[0])
        component = module.split(".")[0]
        alpha = _peft_alpha(alphas, component, module[len(component) + 1:], rank)
        layers[name] = Layer(name, down, up, alpha)
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
    if isinstance(value, (int, float)) and isinstance(r, (int, float)):
        return float(value) / float(r) * rank  # same scale lora_alpha/r for this module
    return float(rank)


# ----------------------------------------------------------------------------- model family


FAMILIES = ("sd1", "sd2", "sdxl")


def detect_family(loaded: LoadedLora) -> str:
    meta = loaded.metadata
    version = (meta.get("ss_base_model_version") or "").lower()
    arch = (meta.get("modelspec.architecture") or "").lower()
    if "sdxl" in version or "stable-diffusion-xl" in arch:
        return "sdxl"
    if version.startswith("sd_v2") or "stable-diffusion-v2" in arch or meta.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1") or "stable-diffusion-v1" in arch:
        return "sd1"
    names = list(loaded.layers)
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names) or any(naming.is_sgm_name(n) for n in names):
        return "sdxl"
    for layer in loaded.layers.values():
        if layer.name.endswith("attn2_to_k"):
            width = int(layer.down.shape[1])
            if width == 2048:
                return "sdxl"
            if width == 1024:
                return "sd2"
            if width == 768:
                return "sd1"
    unet = [n for n in names if n.startswith("lora_unet_")]
    if unet and not any(n.startswith("lora_unet_down_blocks_0_attentions") for n in unet) and any(
        n.startswith("lora_unet_down_blocks_1_attentions") for n in unet
    ):
        return "sdxl"
    return "sd1"


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
        return dense_delta(self.down.float(), self.up.float(), None) * (self.alpha / self.rank)


def _scale_columns(up: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    up2 = up.double().reshape(up.shape[0], up.shape[1]) * coef[None, :]
    return up2.reshape(up.shape)


def factored_svd(up: torch.Tensor, down: torch.Tensor):
    """SVD (u, s, vh) of up @ down without forming it: thin QR of both factors, then the SVD of
    the small k x k core. O((out + in)·k²) instead of O(out·in·min(out, in)), and exact."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u_core, s, vh_core @ q_down.T


def _shaped(layer: Layer, up: torch.Tensor, down: torch.Tensor, k: int):
    down_shape = (k, *layer.weight_shape[1:])
    up_shape = (layer.weight_shape[0], k, 1, 1) if len(layer.weight_shape) == 4 else (layer.weight_shape[0], k)
    return up.reshape(up_shape), down.reshape(down_shape)


def exact_factors(layer: Layer, mask: MaskSpec) -> Converted:
    """The same change as a plain LoRA: rank R (2R for the Ortho forms), columns whose mask is 0
    dropped. Here alpha = alpha/R · new rank (same scale); the writers then fold the scale into
    the factors (convert.loader_safe_alpha, diffusers padding).

    The Ortho forms are re-factorised (factored_svd) instead of written as [P·c, −P0·c0]/[Q; Q0]:
    early in training P·c·Q and P0·c0·Q0 nearly cancel, and a loader that multiplies those
    factors in fp16/fp32 would lose the small difference to rounding."""
    up, down = layer.factor_stack(mask)
    k = int(down.shape[0])
    if layer.up0 is not None:
        u, s, vh = factored_svd(up, down)
        root = s.sqrt()
        up, down = u * root[None, :], root[:, None] * vh
        k = int(s.numel())  # min(2R, out, in): the change has no higher rank
    up, down = _shaped(layer, up, down, k)
    return Converted(layer.name, down, up, layer.scale * k)


def svd_factors(layer: Layer, mask: MaskSpec, rank: Optional[int], keep_energy: Optional[float]) -> Converted:
    """Rank-k truncation of the change (k = --rank, or the smallest k keeping `keep_energy` of
    Σσ², capped by --rank). up = U√S, down = √S Vh; alpha = alpha/R · k (same scale)."""
    u, s, vh = factored_svd(*layer.factor_stack(mask))
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
