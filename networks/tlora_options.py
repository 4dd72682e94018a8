"""Every option of the network, declared once with its type, range, default and help.

The options are fields of two dataclasses (as PEFT's LoraConfig declares its fields):
`NetworkConfig` (what defines the network; stored in every file as JSON) and `TrainingOptions`
(what shapes training only). Each field carries an `Option` in its metadata; from those come the
`--network_args` parser (`parse_network_args`), the check of a file's stored config
(`NetworkConfig.from_json`), the list of accepted keys and the README table
(`python -m networks.tlora_options` prints it).

    python -m networks.tlora_options          # the options table in Markdown
"""

import dataclasses
import json
import math
import re
from typing import Dict, List, Mapping, Optional, Tuple

from .tlora_families import FAMILIES, FAMILY_NAMES

DEFAULT_NUM_TRAIN_TIMESTEPS = 1000


class TLoRAFormatError(ValueError):
    """A file or an argument that networks.tlora cannot use; the message says what to fix."""


# ----------------------------------------------------------------------------- algorithms


@dataclasses.dataclass(frozen=True)
class AlgoSpec:
    """What an algorithm is made of; the layer math is the same for all of them."""

    masked: bool  # timestep rank mask on denoiser layers
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
TRAIN_BLOCKS = ("all", "double", "single")


# ----------------------------------------------------------------------------- one option


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: how its text is parsed and checked, and what the docs say about it.

    kind: int | float | choice | bool | indices (block selection "all", "none", "0,3-5")."""

    kind: str
    help: str
    arg: Optional[str] = None  # the --network_args key when it differs from the field name
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Tuple[str, ...] = ()
    optional: bool = False  # "none" / "" / null allowed (the value is then None)
    families: Tuple[str, ...] = ()  # only for these model families (empty: every family)
    doc_default: Optional[str] = None  # the default as the docs should show it

    def describe_range(self) -> str:
        if self.kind == "mask":
            return "`timestep` \\| `full` \\| `mean` \\| `t=<0..T−1>`"
        if self.kind == "choice":
            return " \\| ".join(f"`{c}`" for c in self.choices)
        if self.kind == "bool":
            return "`True` \\| `False`"
        if self.kind == "indices":
            return "`all` \\| `none` \\| e.g. `0,2-5`"
        low = "" if self.low is None else f"{'>' if self.low_open else '≥'} {self.low:g}"
        high = "" if self.high is None else f"{'<' if self.high_open else '≤'} {self.high:g}"
        what = "int" if self.kind == "int" else "number"
        return f"{what} {', '.join(p for p in (low, high) if p)}".strip()

    def parse(self, key: str, value, source: str = "network_args"):
        """The typed value of `value` (a string from sd-scripts, or a number / bool from TOML and
        Python callers); raises TLoRAFormatError naming the key, the value and what is accepted."""
        if self.kind == "indices":  # "none" / "" select no block (as lora_flux); only a missing value means all
            return None if value is None else parse_block_indices(key, value, source)
        if self.optional and _none_like(value):
            return None
        if self.kind == "choice":
            text = str(value).strip().lower()
            if text not in self.choices:
                raise TLoRAFormatError(f"{source}: {key}={value!r} is unknown; accepted: {', '.join(self.choices)}")
            return text
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no"):
                return False
            raise TLoRAFormatError(f"{source}: {key}={value!r} is not True or False")
        return self._parse_number(key, value, source)

    def _parse_number(self, key, value, source):
        what = "a whole number" if self.kind == "int" else "a number"
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise TLoRAFormatError(f"{source}: {key}={value!r} is not {what}") from None
        if not math.isfinite(number):
            raise TLoRAFormatError(f"{source}: {key}={value!r} must be finite")
        if self.kind == "int":
            if number != int(number):
                raise TLoRAFormatError(f"{source}: {key}={value!r} is not {what}")
            number = int(number)
        else:
            number = float(number)
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            raise TLoRAFormatError(f"{source}: {key}={value!r} must be {'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None and (number >= self.high if self.high_open else number > self.high):
            raise TLoRAFormatError(f"{source}: {key}={value!r} must be {'<' if self.high_open else '<='} {self.high:g}")
        return number

    def check_stored(self, name: str, value, source: str):
        """A value read from a file's JSON config: exact JSON types, then the same range."""
        if value is None:
            if self.optional:
                return None
            raise TLoRAFormatError(f"{source}: metadata field {name!r} has the wrong type (null; expected {self.kind})")
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "choice": isinstance(value, str),
            "bool": isinstance(value, bool),
            "indices": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value),
        }[self.kind]
        if not ok:
            raise TLoRAFormatError(f"{source}: metadata field {name!r} has the wrong type ({type(value).__name__}: {value!r})")
        if self.kind == "indices":
            return sorted(set(value))
        return self.parse(self.arg or name, value, source)


def option(default, kind: str, help: str, **kwargs):
    """A dataclass field that carries its Option."""
    return dataclasses.field(default=default, metadata={"option": Option(kind=kind, help=help, **kwargs)})


def _none_like(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))


def parse_block_indices(key: str, value, source: str = "network_args") -> Optional[List[int]]:
    """sd-scripts' block selection: "all" (None), "none" / "" (no block), or a comma list of
    indices and inclusive ranges "a-b"."""
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        text = str(value).strip().lower()
        if text == "all":
            return None
        if text in ("", "none"):
            return []
        items = [part.strip() for part in text.replace(" ", "").split(",")]
    indices = set()
    for item in items:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise TLoRAFormatError(f"{source}: {key}={value!r}: {item!r} is not an index or a range a-b; e.g. {key}=0,2-5, all or none")
        indices.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return sorted(indices)


# ----------------------------------------------------------------------------- the options


@dataclasses.dataclass
class NetworkConfig:
    """Everything needed to rebuild a network from its file (stored as JSON in the file)."""

    algo: str = option("tlora", "choice", "the method (see Algorithms)", choices=tuple(ALGOS))
    rank: int = option(4, "int", "rank R of every adapted layer", arg="network_dim", low=1, doc_default="4")
    alpha: float = option(1.0, "float", "the change is scaled by alpha / rank; 0 means scale 1", arg="network_alpha", low=0)
    min_rank: int = option(2, "int", "ranks kept at the noisiest timestep, r_min (masked algos)", low=0, doc_default="0.5 · rank")
    conv_rank: Optional[int] = option(None, "int", "also adapt 3x3 convolutions of SD ResNet blocks (LoCon), with this rank",
                                      arg="conv_dim", low=1, optional=True, families=("sd1", "sd2", "sdxl"), doc_default="none")
    conv_alpha: Optional[float] = option(None, "float", "alpha of the 3x3 convolutions", low=0, optional=True,
                                         families=("sd1", "sd2", "sdxl"), doc_default="network_alpha")
    conv_min_rank: Optional[int] = option(None, "int", "r_min of the 3x3 convolutions", low=0, optional=True,
                                          families=("sd1", "sd2", "sdxl"), doc_default="min_rank scaled")
    rank_schedule_power: float = option(1.0, "float", "p in r(t) = floor(((T − t) / T)^p · (R − r_min)) + r_min", low=0, low_open=True)
    num_train_timesteps: int = option(DEFAULT_NUM_TRAIN_TIMESTEPS, "int", "T of the schedule (flow-matching models: t = sigma · T)", low=1)
    init: str = option("last", "choice", "which singular triplets Ortho-LoRA starts from", choices=INITS)
    init_source: str = option("random", "choice", "Ortho-LoRA from a random Gaussian (paper) or the pretrained weight (slow)",
                              choices=INIT_SOURCES)
    targets: str = option("transformer", "choice", "every Linear of the transformer blocks (as sd-scripts' LoRA), or only the "
                          "attention projections (the paper's setting)", choices=TARGETS)
    ortho_reg: float = option(0.0, "float", "TriLoRA only: adds γ(‖PᵀP−I‖² + ‖QQᵀ−I‖²) (AdaLoRA's penalty, not the paper's)", low=0)
    train_blocks: str = option("all", "choice", "adapt double blocks, single blocks or both", choices=TRAIN_BLOCKS,
                               families=("flux",))
    train_double_block_indices: Optional[List[int]] = option(None, "indices", "which double blocks", optional=True,
                                                             families=("flux",), doc_default="all")
    train_single_block_indices: Optional[List[int]] = option(None, "indices", "which single blocks", optional=True,
                                                             families=("flux",), doc_default="all")
    split_qkv: bool = option(False, "bool", "one adapter per part of a fused layer (q, k, v and the MLP input of linear1), "
                             "named as diffusers names the parts", families=("flux",))
    train_t5xxl: bool = option(False, "bool", "also adapt the T5 text encoder (lora_te3)", families=("flux",))
    family: Optional[str] = option(None, "choice", "the model family the network was made for (set from the model)",
                                   choices=FAMILY_NAMES, optional=True)
    layout: Optional[str] = option(None, "choice", "the denoiser layout the network was made for (set from the model)",
                                   choices=tuple(dict.fromkeys(lay.name for f in FAMILIES.values() for lay in f.layouts)), optional=True)

    @property
    def spec(self) -> AlgoSpec:
        return ALGOS[self.algo]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "file", config_key: str = "tlora_config") -> "NetworkConfig":
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise TLoRAFormatError(f"{source}: metadata '{config_key}' is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise TLoRAFormatError(f"{source}: metadata '{config_key}' must be a JSON object, got {type(raw).__name__}")
        options = declared(cls)
        unknown = sorted(set(raw) - set(options))
        if unknown:
            raise TLoRAFormatError(
                f"{source}: metadata '{config_key}' has unknown fields {unknown}; this file was written by a newer networks.tlora, "
                f"update the project"
            )
        values = {name: opt.check_stored(name, raw[name], source) for name, (_, opt) in options.items() if name in raw}
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: str = "network_args") -> None:
        """The checks that involve more than one field (each field's own range is its Option's)."""
        for name, (_, opt) in declared(type(self)).items():
            value = getattr(self, name)
            if value is None and not opt.optional:
                raise TLoRAFormatError(f"{source}: {opt.arg or name} must be given")
            if value is not None and opt.kind != "indices":
                opt.check_stored(name, value, source)
        if self.min_rank > self.rank:
            raise TLoRAFormatError(f"{source}: min_rank={self.min_rank} must be between 0 and the rank {self.rank}")
        if self.conv_rank is not None:
            if self.conv_min_rank is None or self.conv_min_rank > self.conv_rank:
                raise TLoRAFormatError(f"{source}: conv min rank {self.conv_min_rank} must be between 0 and conv_dim {self.conv_rank}")
        elif self.conv_alpha is not None or self.conv_min_rank is not None:
            raise TLoRAFormatError(f"{source}: conv_alpha / conv_min_rank need conv_dim=<rank> to adapt 3x3 convolutions")
        if self.ortho_reg > 0 and self.algo != "trilora":
            raise TLoRAFormatError(f"{source}: ortho_reg is an option of algo=trilora, not of algo={self.algo}")

    def layer_settings(self, is_conv_kxk: bool) -> Tuple[Optional[int], Optional[float], Optional[int]]:
        """(rank, alpha, min_rank) for a layer: kxk convolutions use the conv_* values."""
        if is_conv_kxk:
            return self.conv_rank, self.conv_alpha, self.conv_min_rank
        return self.rank, self.alpha, self.min_rank

    def options_for_family(self, family: Optional[str], source: str = "network_args") -> None:
        """Refuse family-specific options set for a model of another family."""
        if family is None:
            return
        defaults = NetworkConfig()
        for name, (_, opt) in declared(type(self)).items():
            if opt.families and family not in opt.families and getattr(self, name) != getattr(defaults, name):
                raise TLoRAFormatError(
                    f"{source}: {opt.arg or name} is an option of {'/'.join(opt.families)} models, and this model is {family}; remove it"
                )


@dataclasses.dataclass
class TrainingOptions:
    """Options that shape training only; not stored as part of the network's definition."""

    dropout: Optional[float] = option(None, "float", "dropout on the down projection's output (sd-scripts injects "
                                      "--network_dropout here)", low=0, high=1, high_open=True, optional=True, doc_default="none")
    rank_dropout: Optional[float] = option(None, "float", "drop ranks at random (per sample)", low=0, high=1, high_open=True,
                                           optional=True, doc_default="none")
    module_dropout: Optional[float] = option(None, "float", "skip a whole layer's change at random", low=0, high=1, high_open=True,
                                             optional=True, doc_default="none")
    loraplus_lr_ratio: Optional[float] = option(None, "float", "LoRA+: the up factor (P) gets lr · ratio", low=0, low_open=True,
                                                optional=True, doc_default="none")
    loraplus_unet_lr_ratio: Optional[float] = option(None, "float", "LoRA+ ratio for the denoiser only", low=0, low_open=True,
                                                     optional=True, doc_default="none")
    loraplus_text_encoder_lr_ratio: Optional[float] = option(None, "float", "LoRA+ ratio for the text encoders only", low=0,
                                                             low_open=True, optional=True, doc_default="none")


# min_rank given as a fraction of the rank: an input form of min_rank, not a stored field
MIN_RANK_RATIO = Option("float", "min_rank as a fraction of the rank (use one of the two)", low=0, high=1, doc_default="0.5")
# sampling only (gen_img --network_args, apply_tlora): a fixed rank mask instead of the timestep's
MASK = Option("mask", "sampling: `timestep` (default) follows each step's timestep; `full`, `mean` or `t=<int>` pins one mask",
              doc_default="timestep")


def declared(cls) -> Dict[str, Tuple[dataclasses.Field, Option]]:
    """{field name: (field, Option)} of a dataclass declared with option()."""
    return {f.name: (f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata}


def _arg_names(cls) -> Dict[str, str]:
    return {opt.arg or name: name for name, (_, opt) in declared(cls).items()}


# network_args keys: the config's own fields minus those set from create_network's arguments or the model
_NOT_ARGS = ("network_dim", "network_alpha", "family", "layout")
NETWORK_OPTIONS: Tuple[str, ...] = tuple(k for k in _arg_names(NetworkConfig) if k not in _NOT_ARGS) + ("min_rank_ratio",)
TRAINING_OPTIONS: Tuple[str, ...] = tuple(_arg_names(TrainingOptions))
ACCEPTED_OPTIONS: Tuple[str, ...] = NETWORK_OPTIONS + TRAINING_OPTIONS


def parse_network_args(network_dim, network_alpha, options: Mapping[str, object]) -> Tuple[NetworkConfig, TrainingOptions]:
    """kohya's create_network arguments (network_dim, network_alpha and the --network_args, whose
    values arrive as strings) -> a validated NetworkConfig and TrainingOptions. Anything unknown or
    out of range is refused with a message that names it."""
    unknown = sorted(k for k in options if k not in ACCEPTED_OPTIONS)
    if unknown:
        raise TLoRAFormatError(
            f"network_args: unknown key(s) {', '.join(unknown)} for networks.tlora; accepted: {', '.join(ACCEPTED_OPTIONS)}"
        )
    fields = declared(NetworkConfig)
    values: Dict[str, object] = {}
    values["rank"] = 4 if network_dim is None else fields["rank"][1].parse("network_dim", network_dim)
    values["alpha"] = 1.0 if network_alpha is None else fields["alpha"][1].parse("network_alpha", network_alpha)
    by_arg = _arg_names(NetworkConfig)
    for key, value in options.items():
        if key in by_arg and key not in _NOT_ARGS:
            values[by_arg[key]] = fields[by_arg[key]][1].parse(key, value)
    rank = values["rank"]

    if "min_rank" in options and "min_rank_ratio" in options:
        raise TLoRAFormatError("network_args: give either min_rank or min_rank_ratio, not both")
    if "min_rank" in values and values["min_rank"] > rank:
        raise TLoRAFormatError(f"network_args: min_rank={values['min_rank']} is larger than the rank {rank}; use 0..{rank}")
    ratio = MIN_RANK_RATIO.parse("min_rank_ratio", options["min_rank_ratio"]) if "min_rank_ratio" in options else 0.5
    values.setdefault("min_rank", int(round(ratio * rank)))
    # conv layers follow the main settings unless given: alpha = network_alpha, r_min scaled with the rank
    if values.get("conv_rank") is not None:
        if values.get("conv_alpha") is None:
            values["conv_alpha"] = values["alpha"]
        if values.get("conv_min_rank") is None:
            values["conv_min_rank"] = int(round(values["min_rank"] / rank * values["conv_rank"]))
        elif values["conv_min_rank"] > values["conv_rank"]:
            raise TLoRAFormatError(f"network_args: conv_min_rank={values['conv_min_rank']} is larger than conv_dim {values['conv_rank']}")
    config = NetworkConfig(**values)
    config.validate()

    training_fields = declared(TrainingOptions)
    training = TrainingOptions(**{name: opt.parse(name, options[name]) for name, (_, opt) in training_fields.items() if name in options})
    return config, training


# ----------------------------------------------------------------------------- docs


def options_markdown() -> str:
    """The README table of --network_args, generated from the declarations above."""
    rows = ["| key | values | default | meaning |", "|---|---|---|---|"]

    def row(key, opt: Option, default):
        scope = f" ({'/'.join(opt.families).upper().replace('SD1/SD2/SDXL', 'SD')} only)" if opt.families else ""
        shown = opt.doc_default if opt.doc_default is not None else (default if default is not None else "none")
        rows.append(f"| `{key}` | {opt.describe_range()} | `{shown}` | {opt.help}{scope} |")

    fields = declared(NetworkConfig)
    for name, (field, opt) in fields.items():
        key = opt.arg or name
        if key in ("family", "layout"):
            continue
        row(key, opt, field.default)
        if name == "min_rank":
            row("min_rank_ratio", MIN_RANK_RATIO, None)
    for name, (field, opt) in declared(TrainingOptions).items():
        row(name, opt, field.default)
    row("mask", MASK, None)
    return "\n".join(rows)


if __name__ == "__main__":
    print(options_markdown())
