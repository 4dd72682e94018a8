"""The one definition of the networks.tlora file format and of the network's configuration.

Used by the kohya network module, the converters and the standalone trainer alike, so that a
file written by one is read by the others without guessing.

A native file is a safetensors file holding, for every adapted layer `<name>` (kohya names:
`lora_unet_...`, `lora_te_...`, `lora_te1_...`, `lora_te2_...`):

    algo lora, tlora_vanilla     <name>.lora_down.weight  [R, in] or [R, in, kh, kw]
                                 <name>.lora_up.weight    [out, R] or [out, R, 1, 1]
                                 <name>.alpha             0-dim
    algo tlora, ortho, trilora   <name>.svd_down.weight   Q  [R, in] or [R, in, kh, kw]
                                 <name>.svd_up.weight     P  [out, R] or [out, R, 1, 1]
                                 <name>.svd_lambda        λ  [R]
                                 <name>.alpha
    algo tlora, ortho also       <name>.svd_down_base.weight, <name>.svd_up_base.weight,
                                 <name>.svd_lambda_base   frozen copies Q0, P0, λ0

The change of a layer is  multiplier · alpha/R · ( P·diag(λ ⊙ m)·Q − P0·diag(λ0 ⊙ m)·Q0 ).
Files of the λ algorithms deliberately do not use the `lora_up`/`lora_down` names: a loader that
knows only kohya LoRA would otherwise apply P·Q without λ and without the base and produce
garbage silently; with other names it reports unknown keys instead. `converters` turns them
into standard LoRA files.

Metadata (all strings, as safetensors requires): `tlora_format_version`, `tlora_config` (JSON of
`NetworkConfig`), plus whatever the host passes (sd-scripts' ss_* keys, modelspec.*).
"""

import dataclasses
import json
import math
import os
import struct
import tempfile
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

FORMAT_VERSION = 1
METADATA_VERSION_KEY = "tlora_format_version"
METADATA_CONFIG_KEY = "tlora_config"
NETWORK_MODULE = "networks.tlora"
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000


@dataclasses.dataclass(frozen=True)
class AlgoSpec:
    """What an algorithm is made of; the layer math is the same for all of them."""

    masked: bool  # timestep rank mask on U-Net layers
    has_lambda: bool  # trainable diagonal λ between up and down
    has_base: bool  # frozen copy subtracted, so the change is zero at init
    init: str  # how factors start: "ortho", "gaussian", "kaiming", "kaiming_zero_lambda"


ALGOS: Dict[str, AlgoSpec] = {
    "tlora": AlgoSpec(masked=True, has_lambda=True, has_base=True, init="ortho"),
    "tlora_vanilla": AlgoSpec(masked=True, has_lambda=False, has_base=False, init="gaussian"),
    "ortho": AlgoSpec(masked=False, has_lambda=True, has_base=True, init="ortho"),
    "trilora": AlgoSpec(masked=False, has_lambda=True, has_base=False, init="kaiming_zero_lambda"),
    "lora": AlgoSpec(masked=False, has_lambda=False, has_base=False, init="kaiming"),
}
INITS = ("last", "principal", "middle")
INIT_SOURCES = ("random", "weight")
TARGETS = ("transformer", "attention")

# Key suffixes of one layer's tensors, by role. The layer module registers its tensors under
# exactly these names so that `network.state_dict()` keys equal the file's keys (sd-scripts'
# generation scripts call `network.load_state_dict(file_tensors)` directly).
KOHYA_KEYS = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha"}
SVD_KEYS = {
    "down": "svd_down.weight",
    "up": "svd_up.weight",
    "lambda": "svd_lambda",
    "down_base": "svd_down_base.weight",
    "up_base": "svd_up_base.weight",
    "lambda_base": "svd_lambda_base",
    "alpha": "alpha",
}


def key_names(algo: str) -> Dict[str, str]:
    """Role -> key suffix for one layer of `algo`."""
    spec = ALGOS[algo]
    if not spec.has_lambda:
        return dict(KOHYA_KEYS)
    keys = {k: SVD_KEYS[k] for k in ("down", "up", "lambda", "alpha")}
    if spec.has_base:
        keys.update({k: SVD_KEYS[k] for k in ("down_base", "up_base", "lambda_base")})
    return keys


ALL_SUFFIXES = tuple(sorted(set(KOHYA_KEYS.values()) | set(SVD_KEYS.values()), key=len, reverse=True))


class TLoRAFormatError(ValueError):
    """A file or an argument that networks.tlora cannot use; the message says what to fix."""


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass
class NetworkConfig:
    """Everything needed to rebuild a network from its file (training-only options excluded)."""

    algo: str = "tlora"
    rank: int = 4
    alpha: float = 1.0
    min_rank: int = 2
    conv_rank: Optional[int] = None  # LoCon 3x3 convolutions in ResNet blocks; None = not adapted
    conv_alpha: Optional[float] = None
    conv_min_rank: Optional[int] = None
    rank_schedule_power: float = 1.0
    num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS
    init: str = "last"
    init_source: str = "random"
    targets: str = "transformer"
    ortho_reg: float = 0.0

    @property
    def spec(self) -> AlgoSpec:
        return ALGOS[self.algo]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "file") -> "NetworkConfig":
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise TLoRAFormatError(f"{source}: metadata '{METADATA_CONFIG_KEY}' is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise TLoRAFormatError(f"{source}: metadata '{METADATA_CONFIG_KEY}' must be a JSON object, got {type(raw).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise TLoRAFormatError(
                f"{source}: metadata '{METADATA_CONFIG_KEY}' has unknown fields {unknown}; "
                f"this file was written by a newer networks.tlora, update the project"
            )
        kwargs = {}
        for name, value in raw.items():
            kwargs[name] = _check_json_type(name, value, source)
        config = cls(**kwargs)
        config.validate(source)
        return config

    def validate(self, source: str = "network_args") -> None:
        if self.algo not in ALGOS:
            raise TLoRAFormatError(f"{source}: algo={self.algo!r} is unknown; accepted: {', '.join(ALGOS)}")
        if self.rank < 1:
            raise TLoRAFormatError(f"{source}: network_dim (rank) must be >= 1, got {self.rank}")
        if not 0 <= self.min_rank <= self.rank:
            raise TLoRAFormatError(f"{source}: min_rank={self.min_rank} must be between 0 and the rank {self.rank}")
        if self.conv_rank is not None:
            if self.conv_rank < 1:
                raise TLoRAFormatError(f"{source}: conv_dim must be >= 1, got {self.conv_rank}")
            if self.conv_min_rank is None or not 0 <= self.conv_min_rank <= self.conv_rank:
                raise TLoRAFormatError(f"{source}: conv min rank {self.conv_min_rank} must be between 0 and conv_dim {self.conv_rank}")
        if not (self.rank_schedule_power > 0 and math.isfinite(self.rank_schedule_power)):
            raise TLoRAFormatError(f"{source}: rank_schedule_power must be a positive number, got {self.rank_schedule_power}")
        if self.num_train_timesteps < 1:
            raise TLoRAFormatError(f"{source}: num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.init not in INITS:
            raise TLoRAFormatError(f"{source}: init={self.init!r} is unknown; accepted: {', '.join(INITS)}")
        if self.init_source not in INIT_SOURCES:
            raise TLoRAFormatError(f"{source}: init_source={self.init_source!r} is unknown; accepted: {', '.join(INIT_SOURCES)}")
        if self.targets not in TARGETS:
            raise TLoRAFormatError(f"{source}: targets={self.targets!r} is unknown; accepted: {', '.join(TARGETS)}")
        if not (self.ortho_reg >= 0 and math.isfinite(self.ortho_reg)):
            raise TLoRAFormatError(f"{source}: ortho_reg must be a number >= 0, got {self.ortho_reg}")

    def layer_settings(self, is_conv_kxk: bool) -> Tuple[Optional[int], Optional[float], Optional[int]]:
        """(rank, alpha, min_rank) for a layer: kxk convolutions use the conv_* values."""
        if is_conv_kxk:
            return self.conv_rank, self.conv_alpha, self.conv_min_rank
        return self.rank, self.alpha, self.min_rank


def _check_json_type(name: str, value, source: str):
    int_fields = {"rank", "min_rank", "num_train_timesteps"}
    opt_int_fields = {"conv_rank", "conv_min_rank"}
    float_fields = {"alpha", "rank_schedule_power", "ortho_reg"}
    opt_float_fields = {"conv_alpha"}
    str_fields = {"algo", "init", "init_source", "targets"}
    ok = True
    if name in int_fields or (name in opt_int_fields and value is not None):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif name in float_fields or (name in opt_float_fields and value is not None):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif name in str_fields:
        ok = isinstance(value, str)
    if not ok:
        raise TLoRAFormatError(f"{source}: metadata field {name!r} has the wrong type ({type(value).__name__}: {value!r})")
    return value


# Options accepted in --network_args. Values arrive as strings from sd-scripts (dropout may
# arrive as float or None); each parser says what it accepts.
TRAINING_OPTIONS = (
    "dropout",
    "rank_dropout",
    "module_dropout",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
)
NETWORK_OPTIONS = (
    "algo",
    "min_rank",
    "min_rank_ratio",
    "conv_min_rank",
    "rank_schedule_power",
    "num_train_timesteps",
    "init",
    "init_source",
    "conv_dim",
    "conv_alpha",
    "targets",
    "ortho_reg",
)
ACCEPTED_OPTIONS = NETWORK_OPTIONS + TRAINING_OPTIONS


def _none_like(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))


def _parse_number(key, value, kind, low=None, high=None, low_open=False, optional=False):
    if optional and _none_like(value):
        return None
    what = "a whole number" if kind is int else "a number"
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise TLoRAFormatError(f"network_args: {key}={value!r} is not {what}") from None
    if not math.isfinite(number):
        raise TLoRAFormatError(f"network_args: {key}={value!r} must be finite")
    if kind is int:
        if number != int(number):
            raise TLoRAFormatError(f"network_args: {key}={value!r} is not {what}")
        number = int(number)
    if low is not None and (number <= low if low_open else number < low):
        raise TLoRAFormatError(f"network_args: {key}={value!r} must be {'>' if low_open else '>='} {low}")
    if high is not None and number > high:
        raise TLoRAFormatError(f"network_args: {key}={value!r} must be <= {high}")
    return number


def _parse_choice(key, value, choices):
    text = str(value).strip().lower()
    if text not in choices:
        raise TLoRAFormatError(f"network_args: {key}={value!r} is unknown; accepted: {', '.join(choices)}")
    return text


@dataclasses.dataclass
class TrainingOptions:
    """Options that shape training only; not stored as part of the network's definition."""

    dropout: Optional[float] = None
    rank_dropout: Optional[float] = None
    module_dropout: Optional[float] = None
    loraplus_lr_ratio: Optional[float] = None
    loraplus_unet_lr_ratio: Optional[float] = None
    loraplus_text_encoder_lr_ratio: Optional[float] = None


def _resolve_min_rank(key_abs, key_ratio, options, rank, default_ratio=0.5):
    """min_rank from an absolute value or a ratio of the rank (default: half the rank)."""
    if key_abs in options and key_ratio in options:
        raise TLoRAFormatError(f"network_args: give either {key_abs} or {key_ratio}, not both")
    if key_abs in options:
        value = _parse_number(key_abs, options[key_abs], int, low=0)
        if value > rank:
            raise TLoRAFormatError(f"network_args: {key_abs}={value} is larger than the rank {rank}; use 0..{rank}")
        return value
    ratio = default_ratio if key_ratio not in options else _parse_number(key_ratio, options[key_ratio], float, low=0.0, high=1.0)
    return int(round(ratio * rank))


def parse_network_args(network_dim, network_alpha, options: Mapping[str, object]) -> Tuple[NetworkConfig, TrainingOptions]:
    """Turn kohya's create_network arguments into a validated config; raise on anything unknown."""
    unknown = sorted(k for k in options if k not in ACCEPTED_OPTIONS)
    if unknown:
        raise TLoRAFormatError(
            f"network_args: unknown key(s) {', '.join(unknown)} for networks.tlora; accepted: {', '.join(ACCEPTED_OPTIONS)}"
        )
    rank = 4 if network_dim is None else _parse_number("network_dim", network_dim, int, low=1)
    alpha = 1.0 if network_alpha is None else _parse_number("network_alpha", network_alpha, float, low=0.0)
    algo = _parse_choice("algo", options.get("algo", "tlora"), tuple(ALGOS))

    # min_rank_ratio applies to the conv rank too, unless conv_min_rank is given
    min_rank = _resolve_min_rank("min_rank", "min_rank_ratio", options, rank)
    conv_rank = _parse_number("conv_dim", options.get("conv_dim"), int, low=1, optional=True)
    conv_alpha = None
    conv_min_rank = None
    if conv_rank is not None:
        conv_alpha = _parse_number("conv_alpha", options.get("conv_alpha"), float, low=0.0, optional=True)
        conv_alpha = alpha if conv_alpha is None else conv_alpha
        if "conv_min_rank" in options:
            conv_min_rank = _parse_number("conv_min_rank", options["conv_min_rank"], int, low=0)
            if conv_min_rank > conv_rank:
                raise TLoRAFormatError(f"network_args: conv_min_rank={conv_min_rank} is larger than conv_dim {conv_rank}")
        else:
            conv_min_rank = int(round(min_rank / rank * conv_rank))
    elif not _none_like(options.get("conv_alpha")) or "conv_min_rank" in options:
        raise TLoRAFormatError("network_args: conv_alpha / conv_min_rank need conv_dim=<rank> to adapt 3x3 convolutions")

    config = NetworkConfig(
        algo=algo,
        rank=rank,
        alpha=alpha,
        min_rank=min_rank,
        conv_rank=conv_rank,
        conv_alpha=conv_alpha,
        conv_min_rank=conv_min_rank,
        rank_schedule_power=_parse_number("rank_schedule_power", options.get("rank_schedule_power", 1.0), float, low=0.0, low_open=True),
        num_train_timesteps=_parse_number("num_train_timesteps", options.get("num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS), int, low=1),
        init=_parse_choice("init", options.get("init", "last"), INITS),
        init_source=_parse_choice("init_source", options.get("init_source", "random"), INIT_SOURCES),
        targets=_parse_choice("targets", options.get("targets", "transformer"), TARGETS),
        ortho_reg=_parse_number("ortho_reg", options.get("ortho_reg", 0.0), float, low=0.0),
    )
    if config.ortho_reg > 0 and algo != "trilora":
        raise TLoRAFormatError(f"network_args: ortho_reg is an option of algo=trilora, not of algo={algo}")
    config.validate()

    def probability(key):
        return _parse_number(key, options.get(key), float, low=0.0, high=1.0, optional=True)

    training = TrainingOptions(
        dropout=probability("dropout"),
        rank_dropout=probability("rank_dropout"),
        module_dropout=probability("module_dropout"),
        loraplus_lr_ratio=_parse_number("loraplus_lr_ratio", options.get("loraplus_lr_ratio"), float, low=0.0, low_open=True, optional=True),
        loraplus_unet_lr_ratio=_parse_number(
            "loraplus_unet_lr_ratio", options.get("loraplus_unet_lr_ratio"), float, low=0.0, low_open=True, optional=True
        ),
        loraplus_text_encoder_lr_ratio=_parse_number(
            "loraplus_text_encoder_lr_ratio", options.get("loraplus_text_encoder_lr_ratio"), float, low=0.0, low_open=True, optional=True
        ),
    )
    for key in ("dropout", "rank_dropout", "module_dropout"):
        if getattr(training, key) is not None and getattr(training, key) >= 1.0:
            raise TLoRAFormatError(f"network_args: {key}={getattr(training, key)} must be below 1 (1 would drop everything)")
    return config, training


# ----------------------------------------------------------------------------- file reading

_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _describe_non_safetensors(head: bytes) -> Optional[str]:
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip checkpoint (torch.save)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    return None


def check_safetensors_file(path: str) -> None:
    """Validate a file's existence and safetensors framing without reading tensor data."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA file not found: {path!r}; check the path (and --network_weights / --output_dir)")
    if not os.path.isfile(path):
        raise TLoRAFormatError(f"{path!r} is a directory, not a LoRA file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
    kind = _describe_non_safetensors(head)
    if kind is not None:
        raise TLoRAFormatError(
            f"{path!r} is {kind}, not safetensors; networks.tlora loads only .safetensors (pickles can run code). "
            f"Convert it in a trusted environment, e.g. with sd-scripts' --save_model_as safetensors"
        )
    if size < 8:
        raise TLoRAFormatError(f"{path!r} is {size} bytes, too short to be a safetensors file (truncated?)")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > _MAX_HEADER_BYTES or header_len + 8 > size:
        raise TLoRAFormatError(
            f"{path!r} is not a valid safetensors file: header length {header_len} does not fit in {size} bytes (truncated or corrupt)"
        )
    if len(head) > 8 and head[8:9] != b"{":
        raise TLoRAFormatError(f"{path!r} is not a valid safetensors file: the header is not JSON")


def read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and metadata of a safetensors file, with clear errors for anything else."""
    check_safetensors_file(path)
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types; name the file and the cause
        raise TLoRAFormatError(f"{path!r} could not be read as safetensors (corrupt or truncated): {e}") from None
    return tensors, metadata


def read_metadata(path: str) -> Dict[str, str]:
    check_safetensors_file(path)
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise TLoRAFormatError(f"{path!r} could not be read as safetensors (corrupt or truncated): {e}") from None


def config_from_metadata(metadata: Mapping[str, str], source: str = "file") -> Optional[NetworkConfig]:
    """The NetworkConfig stored in a native file, or None for a file without one (plain kohya)."""
    if METADATA_CONFIG_KEY not in metadata:
        return None
    version = metadata.get(METADATA_VERSION_KEY, "")
    try:
        version_number = int(version)
    except (TypeError, ValueError):
        raise TLoRAFormatError(f"{source}: metadata '{METADATA_VERSION_KEY}' is {version!r}, expected a whole number") from None
    if version_number > FORMAT_VERSION:
        raise TLoRAFormatError(
            f"{source}: format version {version_number} is newer than this networks.tlora understands ({FORMAT_VERSION}); update the project"
        )
    return NetworkConfig.from_json(metadata[METADATA_CONFIG_KEY], source)


def split_key(key: str) -> Tuple[str, str]:
    """'lora_unet_x.svd_up.weight' -> ('lora_unet_x', 'svd_up.weight')."""
    for suffix in ALL_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise TLoRAFormatError(f"tensor {key!r} is not a LoRA tensor (expected <layer>.<{'|'.join(ALL_SUFFIXES)}>)")


def group_by_layer(tensors: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """{layer name: {key suffix: tensor}}."""
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, suffix = split_key(key)
        layers.setdefault(name, {})[suffix] = value
    return layers


def detect_algo(layer_keys: Iterable[str]) -> str:
    """The algo family a layer's keys belong to (lora / trilora / ortho)."""
    keys = set(layer_keys)
    if SVD_KEYS["lambda_base"] in keys:
        return "ortho"
    if SVD_KEYS["lambda"] in keys:
        return "trilora"
    return "lora"


def validate_layer_tensors(name: str, tensors: Mapping[str, torch.Tensor], algo: str) -> int:
    """Check one layer's tensors against `algo`'s key set and shapes; returns its rank."""
    expected = key_names(algo)
    required = {v for k, v in expected.items() if k != "alpha"}
    present = set(tensors)
    missing = sorted(required - present)
    extra = sorted(present - set(expected.values()))
    if missing or extra:
        raise TLoRAFormatError(
            f"layer {name!r}: tensors do not match algo={algo} (missing {missing or 'none'}, unexpected {extra or 'none'})"
        )
    down, up = tensors[expected["down"]], tensors[expected["up"]]
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise TLoRAFormatError(f"layer {name!r}: {key} has dtype {value.dtype}; LoRA tensors must be floating point")
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        raise TLoRAFormatError(f"layer {name!r}: down {tuple(down.shape)} / up {tuple(up.shape)} are not LoRA factor shapes")
    rank = down.shape[0]
    if up.shape[1] != rank or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise TLoRAFormatError(f"layer {name!r}: up {tuple(up.shape)} does not match down {tuple(down.shape)} (rank {rank})")
    if "lambda" in expected:
        for role in ("lambda", "lambda_base"):
            if role in expected and tuple(tensors[expected[role]].shape) != (rank,):
                raise TLoRAFormatError(f"layer {name!r}: {expected[role]} has shape {tuple(tensors[expected[role]].shape)}, expected ({rank},)")
        if "down_base" in expected:
            for role, ref in (("down_base", down), ("up_base", up)):
                if tensors[expected[role]].shape != ref.shape:
                    raise TLoRAFormatError(f"layer {name!r}: {expected[role]} shape {tuple(tensors[expected[role]].shape)} differs from {tuple(ref.shape)}")
    if "alpha" in tensors and tensors["alpha"].numel() != 1:
        raise TLoRAFormatError(f"layer {name!r}: alpha must hold one number, got shape {tuple(tensors['alpha'].shape)}")
    return rank


# ----------------------------------------------------------------------------- file writing


def build_metadata(config: Optional[NetworkConfig], extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Metadata for a native file: the host's keys (ss_*, modelspec.*) plus the network config."""
    metadata: Dict[str, str] = {}
    for key, value in (extra or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    if config is not None:
        metadata[METADATA_VERSION_KEY] = str(FORMAT_VERSION)
        metadata[METADATA_CONFIG_KEY] = config.to_json()
        metadata.setdefault("ss_network_module", NETWORK_MODULE)
        metadata.setdefault("ss_network_dim", str(config.rank))
        metadata.setdefault("ss_network_alpha", str(config.alpha))
    return metadata


def _remove_stale_temporaries(path: str, age_seconds: float = 3600.0) -> None:
    """Temporary files of earlier saves to the same name that were killed mid-write (an hour old:
    never one that another process may still be writing)."""
    import time

    folder, base = os.path.split(path)
    prefix = "." + base + "."
    now = time.time()
    for entry in os.listdir(folder):
        if entry.startswith(prefix) and entry.endswith(".tmp"):
            stale = os.path.join(folder, entry)
            try:
                if now - os.path.getmtime(stale) > age_seconds:
                    os.unlink(stale)
            except OSError:
                pass


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors that share storage; copy a view that does not own all of its storage."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a safetensors file through a temporary file in the same folder and an atomic rename,
    so the destination is always either the old complete file or the new complete file."""
    from safetensors.torch import save_file

    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    contiguous = {k: _owned(v.detach().to("cpu").contiguous()) for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(contiguous, tmp, metadata=dict(metadata) if metadata else None)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask), or
        # keep the mode of the file it replaces, so a web UI running as another user can read it
        if os.path.exists(path):
            mode = os.stat(path).st_mode & 0o777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _remove_stale_temporaries(path)
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
