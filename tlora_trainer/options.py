"""Every option of train_tlora.py, declared once: name, type, range, default and help.

The argument parser, the reading of `--config_file` TOML files (sd-scripts' way: every table's
keys are argument names), the range and choice checks and the README's options table are all
derived from `OPTIONS`. This module imports no torch, so `--help` and argument errors are
instant:

    python -m tlora_trainer.options        # prints the README options table
"""

import argparse
import dataclasses
import difflib
import math
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

from .errors import UsageError
from .fileio import describe_path, read_text

PROG = "train_tlora.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: presets' relative paths
RANDOM_PREFIX = "random:"

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
SAMPLERS = ("ddim", "euler", "euler_a", "dpmsolver++", "ddpm")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Prodigy")  # matched case-insensitively, as sd-scripts does


@dataclasses.dataclass(frozen=True)
class Range:
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low itself is excluded
    high_open: bool = False  # high itself is excluded

    def contains(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (value == self.high and not self.high_open)

    def text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        return f"<= {_num(self.high)}"


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    kind: type  # str, int, float or bool (a flag)
    default: object
    help: str
    group: str
    range: Optional[Range] = None
    choices: Optional[Tuple[str, ...]] = None
    many: bool = False  # a list: several values on the command line, a TOML array
    only: Optional[Tuple[object, ...]] = None  # accepted for sd-scripts' configs, but only with these values
    path: bool = False  # a path a preset may give relative to the repository
    ours: bool = False  # not an sd-scripts option (presets must not use it)
    metavar: Optional[str] = None

    @property
    def flag(self) -> str:
        return "--" + self.name

    def type_text(self) -> str:
        if self.kind is bool:
            return "flag"
        text = {str: "text", int: "int", float: "number"}[self.kind]
        if self.choices:
            text = " \\| ".join(f"`{c}`" for c in self.choices)
        elif self.only:
            text = " \\| ".join(f"`{c}`" for c in self.only)
        if self.range:
            text += " " + self.range.text()
        return text + (" (list)" if self.many else "")


MODEL, NETWORK, OPTIM, SPEED, OUTPUT, SAMPLES, COMPAT = (
    "Model and data", "Network", "Optimisation", "Speed and memory", "Outputs", "Samples and logs",
    "Accepted from sd-scripts configs (no effect here)",
)
O = Option
POSITIVE = Range(1, None)
STEPS = Range(1, 10**9)
LR = Range(0, 10, low_open=True)
LR_OR_ZERO = Range(0, 10)

OPTIONS: Tuple[Option, ...] = (
    O("config_file", str, None, "TOML read as sd-scripts does: every table's keys are argument names; the command line overrides it", MODEL, metavar="TOML"),
    O("pretrained_model_name_or_path", str, None,
      "local diffusers folder, single-file checkpoint (.safetensors/.ckpt), or random:sd1-tiny / random:sdxl-tiny (random weights, for tests)",
      MODEL, path=True, metavar="MODEL"),
    O("v2", bool, False, "accepted for sd-scripts compatibility; SD 2.x is detected from the model", MODEL),
    O("v_parameterization", bool, False, "train with v-prediction (SD 2.x 768-v models)", MODEL),
    O("train_data_dir", str, None, "one image, a folder of images, or a folder of sd-scripts <repeats>_<class> folders", MODEL, path=True, metavar="PATH"),
    O("instance_prompt", str, None, "caption of images without a caption file", MODEL, ours=True, metavar="TEXT"),
    O("caption_extension", str, ".caption", "caption file extension, as sd-scripts (use .txt for .txt files)", MODEL, metavar="EXT"),
    O("resolution", str, "512", "'size' or 'width,height' in pixels, multiples of 8", MODEL, metavar="SIZE"),
    O("clip_skip", int, None, "SD 1.x/2.x: use the output of the n-th last text encoder layer", MODEL, range=Range(1, 24)),
    O("network_module", str, "networks.tlora", "the network module; train_tlora.py trains networks.tlora", NETWORK,
      only=("networks.tlora",), metavar="MODULE"),
    O("network_dim", int, None, "rank (default 4)", NETWORK, range=Range(1, 4096)),
    O("network_alpha", float, 1.0, "alpha; the change is scaled by alpha/rank", NETWORK, range=Range(0, 65536)),
    O("network_dropout", float, None, "dropout on the down projection's output", NETWORK, range=Range(0, 1, high_open=True)),
    O("network_args", str, None, "key=value options of networks.tlora, e.g. algo=tlora min_rank=32", NETWORK, many=True, metavar="KEY=VALUE"),
    O("network_weights", str, None, "start from the weights of this networks.tlora file", NETWORK, path=True, metavar="FILE"),
    O("network_train_unet_only", bool, False, "adapt only the U-Net (the paper's setting)", NETWORK),
    O("network_train_text_encoder_only", bool, False, "adapt only the text encoder(s)", NETWORK),
    O("optimizer_type", str, "AdamW", "AdamW, AdamW8bit (needs bitsandbytes) or Prodigy (needs prodigyopt)", OPTIM, choices=OPTIMIZERS, metavar="NAME"),
    O("optimizer_args", str, None, "key=value options of the optimiser, e.g. weight_decay=1e-4 betas=0.9,0.99", OPTIM, many=True, metavar="KEY=VALUE"),
    O("learning_rate", float, 1e-4, "learning rate of every part without its own", OPTIM, range=LR),
    O("unet_lr", float, None, "U-Net learning rate (default: learning_rate)", OPTIM, range=LR_OR_ZERO),
    O("text_encoder_lr", float, None, "text encoder learning rate(s), one or one per SDXL text encoder (default: learning_rate)", OPTIM,
      range=LR_OR_ZERO, many=True),
    O("lr_scheduler", str, "constant", "learning-rate schedule", OPTIM, choices=LR_SCHEDULERS, metavar="NAME"),
    O("lr_warmup_steps", int, 0, "warm-up steps of the learning-rate schedule", OPTIM, range=Range(0, 10**9)),
    O("max_grad_norm", float, 1.0, "gradient clipping norm; 0 disables", OPTIM, range=Range(0, 1e6)),
    O("max_train_steps", int, 1600, "training steps", OPTIM, range=STEPS),
    O("train_batch_size", int, 1, "batch size per process", OPTIM, range=Range(1, 4096)),
    O("seed", int, None, "random seed (default 42)", OPTIM, range=Range(0, 2**32 - 1)),
    O("min_timestep", int, None, "lowest training timestep (default 0)", OPTIM, range=Range(0, 999)),
    O("max_timestep", int, None, "highest training timestep + 1 (default 1000)", OPTIM, range=Range(1, 1000)),
    O("noise_offset", float, None, "noise offset, as sd-scripts", OPTIM, range=Range(0, 1)),
    O("gradient_accumulation_steps", int, 1, "only 1 is supported", OPTIM, only=(1,)),
    O("mixed_precision", str, "no", "mixed precision of the frozen models (the network stays float32)", SPEED, choices=("no", "fp16", "bf16")),
    O("full_fp16", bool, False, "not supported (the network weights stay float32)", SPEED, only=(False,)),
    O("full_bf16", bool, False, "not supported (the network weights stay float32)", SPEED, only=(False,)),
    O("gradient_checkpointing", bool, False, "recompute activations in backward to save memory", SPEED),
    O("sdpa", bool, False, "PyTorch scaled-dot-product attention (the default)", SPEED),
    O("xformers", bool, False, "xformers attention when installed", SPEED),
    O("output_dir", str, None, "where outputs go", OUTPUT, metavar="FOLDER"),
    O("output_name", str, "last", "base name of the output files", OUTPUT, metavar="NAME"),
    O("save_model_as", str, "safetensors", "only safetensors", OUTPUT, only=("safetensors",)),
    O("save_precision", str, None, "dtype of saved weights (default: float)", OUTPUT, choices=("float", "fp16", "bf16")),
    O("save_every_n_steps", int, None, "save the weights and a resumable state every N steps", OUTPUT, range=STEPS),
    O("resume", str, None, "a <name>-stepNNNNNNNN-state folder, or 'latest' (the newest in output_dir)", OUTPUT, metavar="STATE"),
    O("save_kohya", bool, False, "also write <name>-kohya.safetensors, a standard LoRA file", OUTPUT, ours=True),
    O("save_diffusers", bool, False, "also write <name>-diffusers.safetensors", OUTPUT, ours=True),
    O("no_metadata", bool, False, "write only the network's own metadata", OUTPUT),
    O("training_comment", str, None, "stored in the metadata", OUTPUT, metavar="TEXT"),
    O("metadata_title", str, None, "stored in the metadata", OUTPUT, metavar="TEXT"),
    O("metadata_author", str, None, "stored in the metadata", OUTPUT, metavar="TEXT"),
    O("metadata_description", str, None, "stored in the metadata", OUTPUT, metavar="TEXT"),
    O("metadata_license", str, None, "stored in the metadata", OUTPUT, metavar="TEXT"),
    O("metadata_tags", str, None, "comma-separated tags; a tag sd1, sd2 or sdxl refuses a base model of another family", OUTPUT, metavar="TAGS"),
    O("sample_every_n_steps", int, None, "sample images every N steps", SAMPLES, range=STEPS),
    O("sample_at_first", bool, False, "also sample before training", SAMPLES),
    O("sample_prompts", str, None, "text file, one prompt a line; options --n --w --h --s --l --d as sd-scripts", SAMPLES, path=True, metavar="FILE"),
    O("sample_sampler", str, "ddim", "sampler of the sample images", SAMPLES, choices=SAMPLERS),
    O("sample_compare_base", bool, False, "every sample grid also shows each prompt without the network, same seed (a second "
      "row), to compare", SAMPLES, ours=True),
    O("logging_dir", str, None, "TensorBoard logs (needs the tensorboard package)", SAMPLES, metavar="FOLDER"),
    O("log_prefix", str, None, "prefix of the TensorBoard run folder", SAMPLES, metavar="TEXT"),
    O("max_token_length", int, None, "only 75 tokens are used", COMPAT, only=(75, 150, 225)),
    O("mem_eff_attn", bool, False, "PyTorch SDPA is used", COMPAT),
    O("cache_latents", bool, False, "latents are always cached (no augmentation)", COMPAT),
    O("cache_latents_to_disk", bool, False, "latents are cached in memory", COMPAT),
    O("max_data_loader_n_workers", int, None, "images are read once, before training", COMPAT, range=Range(0, 1024)),
    O("persistent_data_loader_workers", bool, False, "images are read once, before training", COMPAT),
    O("no_half_vae", bool, False, "the VAE always runs in float32", COMPAT),
)
BY_NAME: Dict[str, Option] = {o.name: o for o in OPTIONS}
GROUPS = (MODEL, NETWORK, OPTIM, SPEED, OUTPUT, SAMPLES, COMPAT)

EXAMPLES = """examples:
  python train_tlora.py --config_file presets/demo.toml            # no downloads, about four minutes on a CPU
  accelerate launch train_tlora.py --config_file presets/tlora-object-sdxl.toml \\
      --pretrained_model_name_or_path /models/sdxl-base --train_data_dir photos/dog.jpg \\
      --instance_prompt "a photo of sks dog" --output_dir out/dog
  python train_tlora.py --config_file presets/tlora-object-sd15.toml ... --resume latest

exit codes: 0 done, 2 bad input or an output that cannot be written (nothing half-written),
3 the loss/gradients/weights became NaN or infinite (the last good checkpoint is named)."""


# ----------------------------------------------------------------------------- argparse


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2 through UsageError, not argparse's usage dump
        raise UsageError(f"{message} (see `{PROG} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="Train T-LoRA / Ortho-LoRA / TriLoRA / LoRA with diffusers, using sd-scripts' argument names.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    for group_name in GROUPS:
        group = parser.add_argument_group(group_name)
        for option in (o for o in OPTIONS if o.group == group_name):
            help_text = option.help
            details = []
            if option.choices or option.only:
                details.append("one of " + ", ".join(str(c) for c in option.choices or option.only))
            if option.range:
                details.append("range " + option.range.text())
            if option.default not in (None, False):
                details.append(f"default {option.default}")
            if details:
                help_text += f" [{'; '.join(details)}]"
            if option.kind is bool:
                group.add_argument(option.flag, action="store_true", help=help_text)
            else:
                group.add_argument(option.flag, type=option.kind, default=option.default, nargs="*" if option.many else None,
                                   help=help_text, metavar=option.metavar or option.kind.__name__.upper())
    return parser


def defaults() -> Dict[str, object]:
    return {o.name: o.default for o in OPTIONS}


# ----------------------------------------------------------------------------- config files


def read_config_file(path: str) -> Dict[str, object]:
    """sd-scripts' read_config_from_file: top-level keys as they are, every table's keys flattened."""
    import toml

    text = read_text(path, "config file")
    try:
        raw = toml.loads(text)
    except (toml.TomlDecodeError, TypeError, ValueError, IndexError) as e:  # toml raises several kinds on bad input
        raise UsageError(f"{path}: not valid TOML ({str(e).splitlines()[0] if str(e) else type(e).__name__}); fix the syntax") from None
    flat: Dict[str, object] = {}
    for section, value in raw.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[section] = value
    return flat


def coerce(option: Option, value, source: str):
    """A TOML value as the option's type (argparse does not convert values given as a namespace)."""
    where = f"{source}: {option.name} = {value!r}"
    if option.kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: must be true or false")
        return value
    if option.many:
        values = value if isinstance(value, list) else [value]
        return [_coerce_one(option, v, where) for v in values]
    if option.name == "resolution" and isinstance(value, (int, list)) and not isinstance(value, bool):
        return ",".join(str(v) for v in (value if isinstance(value, list) else [value]))
    return _coerce_one(option, value, where)


def _coerce_one(option: Option, value, where: str):
    if isinstance(value, (list, dict)):
        raise UsageError(f"{where}: must be a single {option.kind.__name__}, not a {'list' if isinstance(value, list) else 'table'}")
    if isinstance(value, bool) or (option.kind is not str and isinstance(value, str)):
        raise UsageError(f"{where}: must be a {_kind_name(option.kind)}, not {'true/false' if isinstance(value, bool) else 'text'}")
    if option.kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise UsageError(f"{where}: must be a whole number")
        return int(value)
    if option.kind is float:
        return float(value)
    if not isinstance(value, (str, int, float)):  # TOML dates and times
        raise UsageError(f"{where}: must be text")
    return str(value)


def _kind_name(kind) -> str:
    return {int: "whole number", float: "number", str: "text"}[kind]


def _config_path(value: str) -> str:
    return value if value.endswith(".toml") else value + ".toml"  # as sd-scripts


# ----------------------------------------------------------------------------- parse + check


# keys of sd-scripts' flux_train_network.py that no SD trainer has: a FLUX preset given to us
SD_SCRIPTS_FLUX_KEYS = frozenset({
    "ae", "apply_t5_attn_mask", "blocks_to_swap", "clip_l", "discrete_flow_shift", "guidance_scale", "model_prediction_type",
    "model_type", "t5xxl", "t5xxl_max_token_length", "timestep_sampling", "weighting_scheme", "split_mode",
})


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line + config file -> namespace, every value type- and range-checked.

    `args._sources` maps each option that was given to where ("--name" or the TOML file)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    first = parser.parse_args(argv)
    from_cli = _given_on_command_line(argv)
    sources = {name: "--" + name for name in from_cli}
    if first.config_file:
        path = _config_path(first.config_file)
        flat = read_config_file(path)
        flat.pop("config_file", None)
        unknown = [k for k in flat if k not in BY_NAME]
        flux_keys = sorted(set(unknown) & SD_SCRIPTS_FLUX_KEYS)
        if flux_keys:
            raise UsageError(
                f"{path} is a configuration for sd-scripts' flux_train_network.py (it sets {', '.join(flux_keys)}); {PROG} "
                f"trains SD 1.x/2.x and SDXL. Train FLUX.1 with `accelerate launch flux_train_network.py --config_file {path} ...` "
                f"(its network_module is networks.tlora)"
            )
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, list(BY_NAME), n=1)
                hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise UsageError(
                f"{path}: unknown config key(s) {', '.join(hints)}. {PROG} takes sd-scripts' argument names; "
                f"see `{PROG} --help`, and remove or rename the key(s)"
            )
        values = {k: coerce(BY_NAME[k], v, path) for k, v in flat.items()}
        # exactly sd-scripts: the namespace holds the file's values; flags on the command line override
        args = parser.parse_args(argv, namespace=argparse.Namespace(**values))
        args.config_file = path
        for key in values:
            sources.setdefault(key, path)
        _resolve_preset_paths(args, values, from_cli)
    else:
        args = first
    args._sources = sources
    args._config_keys = [k for k, where in sources.items() if not where.startswith("--")]
    check_values(args)
    return args


def _given_on_command_line(argv: Sequence[str]) -> set:
    given = set()
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            if name in BY_NAME:
                given.add(name)
    return given


def _resolve_preset_paths(args, values, from_cli) -> None:
    """Paths in a config file that do not exist relative to the working directory are also looked
    up beside train_tlora.py, so the demo presets run from any folder."""
    for option in OPTIONS:
        value = getattr(args, option.name)
        if not option.path or option.name not in values or option.name in from_cli or not isinstance(value, str):
            continue
        if value.startswith(RANDOM_PREFIX) or os.path.isabs(value) or os.path.lexists(value):
            continue
        if os.path.lexists(os.path.join(ROOT, value)):
            setattr(args, option.name, os.path.join(ROOT, value))


def where(args, name: str) -> str:
    """How the user gave an option, for messages: '--name' or 'file.toml: name'."""
    source = getattr(args, "_sources", {}).get(name, "--" + name)
    return source if source.startswith("--") else f"{source}: {name}"


def check_values(args) -> None:
    """Ranges, choices and the options accepted only with one value; all from OPTIONS."""
    for option in OPTIONS:
        value = getattr(args, option.name)
        if value is None:
            continue
        values = value if option.many else [value]
        for item in values:
            _check_one(args, option, item)
    lo = 0 if args.min_timestep is None else args.min_timestep
    hi = 1000 if args.max_timestep is None else args.max_timestep
    if lo >= hi:
        raise UsageError(f"{where(args, 'min_timestep')}={lo} and {where(args, 'max_timestep')}={hi}: need min_timestep < max_timestep")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UsageError("network_train_unet_only and network_train_text_encoder_only exclude each other; give one of them")
    if args.text_encoder_lr is not None and not 1 <= len(args.text_encoder_lr) <= 2:
        raise UsageError(f"{where(args, 'text_encoder_lr')}: give one value, or two for SDXL's text encoders")
    parse_resolution(args.resolution, where(args, "resolution"))
    for name in ("network_args", "optimizer_args"):
        parse_key_values(getattr(args, name), where(args, name))
    if args.output_name is not None and (not args.output_name.strip() or os.sep in args.output_name or args.output_name in (".", "..")
                                         or (os.altsep and os.altsep in args.output_name)):
        raise UsageError(f"{where(args, 'output_name')}={args.output_name!r}: must be a plain file name (no folder part); use --output_dir for the folder")


def _check_one(args, option: Option, value) -> None:
    shown = f"{where(args, option.name)}={value!r}"
    if option.only is not None and value not in option.only:
        allowed = ", ".join(repr(v) for v in option.only if v is not None)
        raise UsageError(f"{shown} is not supported by {PROG}; remove it or use {allowed}")
    if option.choices is not None:
        if option.name == "optimizer_type":
            ok = str(value).lower() in {c.lower() for c in option.choices}
        else:
            ok = value in option.choices
        if not ok:
            close = difflib.get_close_matches(str(value), option.choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{shown} is not one of {', '.join(option.choices)}{hint}")
    if option.range is not None and option.kind in (int, float) and not option.range.contains(value):
        kind = "a whole number" if option.kind is int else "a finite number"
        default = f" (default {option.default})" if option.default is not None else ""
        bounded = option.range.low is not None and option.range.high is not None
        raise UsageError(f"{shown}: must be {kind} {'in ' if bounded else ''}{option.range.text()}{default}")


def parse_resolution(value, source: str = "resolution") -> Tuple[int, int]:
    """(width, height) from '512' or '768,512'."""
    text = str(value).strip()
    example = "give 'size' or 'width,height' in pixels, e.g. 512 or 768,512"
    try:
        parts = [int(p.strip()) for p in text.split(",")]
    except ValueError:
        raise UsageError(f"{source}={value!r}: {example}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 8 or max(parts) > 8192:
        raise UsageError(f"{source}={value!r}: {example}, each from 8 to 8192")
    for size in parts:
        if size % 8 != 0:
            low, high = size // 8 * 8, size // 8 * 8 + 8
            raise UsageError(f"resolution {size} is not a multiple of 8 (the VAE downsamples by 8); use {low or 8} or {high}")
    return parts[0], parts[1]


def parse_key_values(values, source: str) -> Dict[str, str]:
    """['a=1', 'b=x'] -> {'a': '1', 'b': 'x'}, split on the first '=' as sd-scripts does."""
    result = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{source}: {item!r} is not key=value")
        result[key.strip()] = value.strip()
    return result


def describe_given_path(args, name: str) -> str:
    """'--name /path (a FIFO)' for messages about a path option."""
    return f"{where(args, name)}={getattr(args, name)} ({describe_path(getattr(args, name))})"


# ----------------------------------------------------------------------------- README


def options_markdown() -> str:
    """The README's options table (a test keeps README.md equal to this)."""
    lines = ["| option | type / values | default | meaning |", "|---|---|---|---|"]
    for group_name in GROUPS:
        lines.append(f"| **{group_name}** | | | |")
        for o in (o for o in OPTIONS if o.group == group_name):
            default = "" if o.default in (None, False) else f"`{o.default}`"
            meaning = o.help.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;") + (" *(train_tlora.py only)*" if o.ours else "")
            lines.append(f"| `--{o.name}` | {o.type_text()} | {default} | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_markdown())
