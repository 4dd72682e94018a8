"""`info`: what a LoRA file is (native, kohya or diffusers/PEFT), read as data."""

import json
from collections import Counter

from networks.tlora_format import METADATA_CONFIG_KEY

from .core import layer_is_denoiser, load_lora


def _short(value: str, limit: int = 160) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= limit else value[:limit] + f"... ({len(value)} chars)"


def describe(path: str, show_metadata: bool = True) -> str:
    loaded = load_lora(path)
    layers = list(loaded.layers.values())
    ranks = Counter(layer.rank for layer in layers)
    alphas = Counter(round(layer.alpha, 6) for layer in layers)
    unet = sum(layer_is_denoiser(layer.name) for layer in layers)
    convs = sum(layer.down.dim() == 4 for layer in layers)
    lines = [
        f"file: {path}",
        f"  format: {loaded.kind}" + (" (networks.tlora native)" if loaded.kind == "native" else ""),
        f"  algo: {loaded.algo}",
        f"  base model family: {loaded.families[0].title} ({loaded.families[0].name})"
        + (f"; could also be {', '.join(f.name for f in loaded.families[1:])}" if len(loaded.families) > 1 and loaded.config is None else ""),
        f"  modules: {len(layers)} ({unet} {'DiT' if loaded.families[0].flow_matching else 'U-Net'}, {len(layers) - unet} text encoder; {convs} conv)",
        f"  rank(s): " + ", ".join(f"{r} x{c}" for r, c in sorted(ranks.items())),
        f"  alpha(s): " + ", ".join(f"{a:g} x{c}" for a, c in sorted(alphas.items())),
        f"  dtype(s): {', '.join(loaded.dtypes)}",
        f"  size: {loaded.size / 1e6:.2f} MB",
    ]
    if loaded.config is not None:
        c = loaded.config
        lines.append(f"  min_rank: {c.min_rank}" + (f" (conv {c.conv_min_rank})" if c.conv_rank else "")
                     + f", rank_schedule_power: {c.rank_schedule_power:g}, T: {c.num_train_timesteps}, masked: {c.spec.masked}")
        lines.append(f"  init: {c.init} from {c.init_source}; targets: {c.targets}")
    if show_metadata and loaded.metadata:
        lines.append("  metadata:")
        for key in sorted(loaded.metadata):
            if key == METADATA_CONFIG_KEY:
                continue
            value = loaded.metadata[key]
            lines.append(f"    {key}: {_short(value if isinstance(value, str) else json.dumps(value))}")
    return "\n".join(lines)
