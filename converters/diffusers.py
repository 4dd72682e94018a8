"""Timestep-aware T-LoRA in diffusers pipelines: attach a native file so that every denoising
step uses the rank mask of its own timestep, with any scheduler.

    from converters.diffusers import apply_tlora, remove_tlora
    apply_tlora(pipe, "tlora.safetensors", scale=1.0)            # per-step mask (the real T-LoRA)
    apply_tlora(pipe, "tlora.safetensors", mask="mean")          # or a fixed mask, for comparison
    image = pipe(prompt).images[0]
    remove_tlora(pipe)

The network is networks.tlora's own (create_network_from_weights over pipe.unet and the text
encoders): its U-Net pre-hook reads the timestep argument of each `unet(latents, t, ...)` call.
SGM-named SDXL files (what sd-scripts trains) are renamed to the diffusers layout first."""

from typing import List, Optional

import torch

import networks.tlora as tlora
from networks.tlora_format import read_safetensors

from . import naming
from .core import ConversionError, MaskSpec

_ATTR = "_tlora_networks"


def _text_encoders(pipe) -> List[torch.nn.Module]:
    encoders = []
    for attr in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, attr, None)
        if module is not None:
            encoders.append(module)
    return encoders


def _rename_for_diffusers(tensors, unet, n_text_encoders):
    layers_per_block = naming.layers_per_block_of(getattr(unet, "config", {}))
    renamed = {}
    for key, value in tensors.items():
        layer, _, suffix = key.partition(".")
        if naming.is_sgm_name(layer):
            layer = naming.unet_name_from_sgm(layer, layers_per_block)
        if n_text_encoders == 2 and layer.startswith("lora_te_"):
            layer = "lora_te1_" + layer[len("lora_te_"):]
        renamed[f"{layer}.{suffix}"] = value
    return renamed


def apply_tlora(pipe, path: str, scale: float = 1.0, mask: Optional[str] = None, text_encoders: bool = True):
    """Attach a native (or plain kohya) LoRA file to a diffusers SD1/SD2/SDXL pipeline.

    mask=None: T-LoRA's timestep mask at every U-Net call (the timestep the pipeline passes);
    "full" / "mean" / "t=<0..999>": one fixed mask for every step. Returns the network."""
    unet = pipe.unet
    encoders = _text_encoders(pipe) if text_encoders else []
    try:
        tensors, _ = read_safetensors(path)
    except (OSError, ValueError) as e:
        raise ConversionError(str(e)) from None
    tensors = _rename_for_diffusers(tensors, unet, len(_text_encoders(pipe)))
    if not text_encoders:
        tensors = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    try:
        network, _ = tlora.create_network_from_weights(scale, path, None, encoders, unet, weights_sd=tensors, for_inference=True)
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from None
    ref = next(unet.parameters())
    network.to(device=ref.device, dtype=ref.dtype)
    network.eval()
    if mask is None:
        network.apply_to(encoders, unet, apply_text_encoder=bool(encoders), apply_unet=True)
    else:
        spec = MaskSpec.parse(mask)
        network.apply_to(encoders, None, apply_text_encoder=bool(encoders), apply_unet=True)
        network.set_fixed_mask(str(spec))
    networks = getattr(pipe, _ATTR, None)
    if networks is None:
        networks = []
        setattr(pipe, _ATTR, networks)
    networks.append(network)
    return network


def remove_tlora(pipe) -> int:
    """Detach every network apply_tlora attached (newest first); returns how many."""
    networks = getattr(pipe, _ATTR, None) or []
    count = len(networks)
    for network in reversed(networks):
        network.remove()
    if hasattr(pipe, _ATTR):
        delattr(pipe, _ATTR)
    return count
