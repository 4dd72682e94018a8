"""Timestep-aware T-LoRA in diffusers pipelines: attach a native file so that every denoising
step uses the rank mask of its own timestep, with any scheduler.

    from converters.diffusers import apply_tlora, remove_tlora
    apply_tlora(pipe, "tlora.safetensors", scale=1.0)            # per-step mask (the real T-LoRA)
    apply_tlora(pipe, "tlora.safetensors", mask="mean")          # or a fixed mask, for comparison
    image = pipe(prompt).images[0]
    remove_tlora(pipe)

SD 1.x/2.x, SDXL (`pipe.unet`, t in 0..999) and FLUX.1 (`pipe.transformer`, called with
sigma in [0, 1]: t = sigma · T, so any flow-matching scheduler and shift works). The network is
networks.tlora's own (create_network_from_weights over the pipeline's denoiser and text
encoders): its pre-hook reads the timestep of each denoiser call. A file in another layout of
the family (sd-scripts' SGM SDXL names, sd-scripts' fused FLUX qkv / linear1) is first put into
the pipeline's layout, exactly (networks.tlora_families.to_model_layout)."""

from typing import List, Optional

import torch

import networks.tlora as tlora
from networks.tlora_families import family_of_model, layers_per_block_of, to_model_layout
from networks.tlora_format import METADATA_CHECKSUM_KEY, TLoRAFormatError, group_by_layer, read_safetensors, validate_native

from .core import ConversionError, parse_mask

_ATTR = "_tlora_networks"


def _denoiser(pipe):
    for attr in ("unet", "transformer"):
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ConversionError(f"{type(pipe).__name__} has no unet or transformer; apply_tlora takes SD, SDXL and FLUX pipelines")


def _text_encoders(pipe) -> List[Optional[torch.nn.Module]]:
    """The pipeline's text encoders in the host's order (a missing one as None)."""
    encoders = [getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)]
    while encoders and encoders[-1] is None:
        encoders.pop()
    return encoders


def _flux_hidden_size(denoiser) -> Optional[int]:
    for name, module in denoiser.named_modules():
        if name.endswith("attn.to_q") and hasattr(module, "out_features"):
            return int(module.out_features)
    return None


def apply_tlora(pipe, path: str, scale: float = 1.0, mask: Optional[str] = None, text_encoders: bool = True):
    """Attach a native (or plain kohya) LoRA file to a diffusers SD1/SD2/SDXL/FLUX pipeline.

    mask=None: T-LoRA's timestep mask at every denoiser call (the timestep the pipeline passes);
    "full" / "mean" / "t=<0..T-1>": one fixed mask for every step. Returns the network."""
    denoiser = _denoiser(pipe)
    family = family_of_model(denoiser, _text_encoders(pipe))
    if family is None:
        raise ConversionError(f"{type(denoiser).__name__} is not a model family networks.tlora knows")
    layout = family.layout_of_model(denoiser)
    encoders = _text_encoders(pipe) if text_encoders else []
    try:
        tensors, metadata = read_safetensors(path)
        validate_native(tensors, metadata, path)  # the file as written (its checksum covers these tensors)
        layers = to_model_layout(group_by_layer(tensors), family, layout, layers_per_block_of(getattr(denoiser, "config", {})),
                                 _flux_hidden_size(denoiser))
    except (TLoRAFormatError, ValueError) as e:
        raise ConversionError(f"{path}: {e}") from None
    metadata = {k: v for k, v in metadata.items() if k != METADATA_CHECKSUM_KEY}
    tensors = {f"{name}.{suffix}": value for name, layer in layers.items() for suffix, value in layer.items()}
    if not text_encoders:
        tensors = {k: v for k, v in tensors.items() if k.startswith(layout.prefix + "_")}
    fixed = None if mask is None else parse_mask(mask)
    try:
        network, _ = tlora.create_network_from_weights(scale, path, None, encoders, denoiser, weights_sd=tensors, for_inference=True,
                                                       metadata=metadata, **({} if fixed is None else {"mask": fixed}))
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from None
    ref = next(denoiser.parameters())
    network.to(device=ref.device, dtype=ref.dtype)
    network.eval()
    # a fixed mask needs no timestep hook
    network.apply_to(encoders, denoiser if fixed is None else None, apply_text_encoder=bool(encoders), apply_unet=True)
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
