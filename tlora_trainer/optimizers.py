"""The optimiser: its package, and `--optimizer_args` checked against what the chosen optimiser
accepts (names from its signature, value types from its defaults, values by a trial construction
on one dummy parameter), all before any model loads."""

import ast
import importlib
import importlib.util
import inspect
import math
from typing import Dict

import torch

from .errors import UsageError
from .options import parse_key_values, where

# lower-case name -> (module, class name, pip package or None when part of torch)
OPTIMIZER_CLASSES = {
    "adamw": ("torch.optim", "AdamW", None),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
}
NOT_OPTIONS = {"self", "params", "lr", "args", "kwargs"}


def optimizer_class(args):
    module, name, package = OPTIMIZER_CLASSES[args.optimizer_type.lower()]
    if package is not None and importlib.util.find_spec(package) is None:
        raise UsageError(
            f"optimizer_type={args.optimizer_type} needs the {package} package, which is not installed: "
            f"run `pip install {package}`, or use --optimizer_type AdamW"
        )
    return getattr(importlib.import_module(module), name)


def _literal(text: str):
    """sd-scripts reads optimizer_args values with ast.literal_eval, keeping text that is no literal."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _fits(default, value) -> bool:
    """Does `value` have the type the optimiser's default has?"""
    if default is None:  # e.g. foreach=None: any literal (True, False, None, a number), not free text
        return not isinstance(value, str)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, tuple):
        return (isinstance(value, (tuple, list)) and len(value) == len(default)
                and all(_fits(d, v) for d, v in zip(default, value)))
    return isinstance(value, type(default))


def check_optimizer_args(args) -> Dict[str, object]:
    """The parsed `--optimizer_args` for the chosen optimiser; raises UsageError naming a bad one."""
    cls = optimizer_class(args)
    source = where(args, "optimizer_args")
    parameters = {name: p for name, p in inspect.signature(cls.__init__).parameters.items()
                  if name not in NOT_OPTIONS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    options = {}
    for key, text in parse_key_values(args.optimizer_args, source).items():
        if key == "lr":
            raise UsageError(f"{source}: lr={text}: give the learning rate with --learning_rate (or --unet_lr / --text_encoder_lr)")
        if key not in parameters:
            raise UsageError(f"{source}: {cls.__name__} has no option {key!r}; it takes {', '.join(sorted(parameters))}")
        value = _literal(text)
        default = parameters[key].default
        if default is not inspect.Parameter.empty and not _fits(default, value):
            raise UsageError(f"{source}: {key}={text!r} is not a valid value for {cls.__name__} (its default is {default!r})")
        options[key] = value
    if cls.__module__.startswith(("torch.", "prodigyopt")):  # pure-Python optimisers: let them validate values too
        try:
            cls([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate, **options)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{source}: {cls.__name__} refuses {' '.join(args.optimizer_args or [])!r} ({e})") from None
    return options


def build_optimizer(args, param_groups, options: Dict[str, object]):
    return optimizer_class(args)(param_groups, lr=args.learning_rate, **options)
