"""Shared helpers for the network-module tests: a model 'layout' bundles text encoders, a U-Net
and the way its host calls them (sd-scripts SD1, sd-scripts SDXL/SGM, diffusers SDXL)."""

import dataclasses
from typing import Callable, List

import torch

import tiny_models as tm

ALGOS = ["tlora", "tlora_vanilla", "ortho", "trilora", "lora"]
LAYOUTS = ["sd1", "sgm", "sdxl"]


@dataclasses.dataclass
class Layout:
    name: str
    text_encoders: List[torch.nn.Module]
    unet: torch.nn.Module
    call: Callable  # call(x, timesteps, context) -> noise prediction, the way the host calls the U-Net

    def text_encoder_arg(self):
        """What sd-scripts passes to create_network: one model for SD1, a list for SDXL."""
        return self.text_encoders[0] if len(self.text_encoders) == 1 else self.text_encoders

    def encode(self, ids):
        hidden = [te(ids).last_hidden_state for te in self.text_encoders]
        return torch.cat(hidden, dim=-1)


def make_layout(name: str, seed: int = 0) -> Layout:
    if name == "sd1":
        tes, unet = tm.sd1_models(seed)
        return Layout(name, tes, unet, lambda x, t, ctx: unet(x, t, ctx).sample)
    if name == "sgm":
        tes, unet = tm.sgm_models(seed)
        g = torch.Generator().manual_seed(seed)
        y_cache = {}

        def call(x, t, ctx):
            if x.shape[0] not in y_cache:
                y_cache[x.shape[0]] = torch.randn(x.shape[0], tm.CROSS_DIM + 6 * 8, generator=g)
            return unet(x, t, ctx, y_cache[x.shape[0]])

        return Layout(name, tes, unet, call)
    if name == "sdxl":
        tes, unet = tm.sdxl_models(seed)
        return Layout(name, tes, unet, lambda x, t, ctx: unet(x, t, ctx, added_cond_kwargs=tm.sdxl_added_cond(x.shape[0])).sample)
    raise ValueError(name)


def inputs(batch=2, seed=1, tokens=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ids = torch.randint(0, 1000, (batch, tokens), generator=g)
    return x, ids


# min_rank 3 differs from both defaults (the config field's 2 and half of rank 8), so a file that
# lost it, or a parser that ignored it, gives other outputs at high timesteps
MIN_RANK = "3"


def network_args(algo, **extra):
    args = {"algo": algo}
    if algo in ("tlora", "tlora_vanilla"):
        args["min_rank"] = MIN_RANK
    args.update(extra)
    return args


def randomise(network, seed=0):
    """Give every trainable factor a random value (a 'trained' network), keeping frozen copies."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
