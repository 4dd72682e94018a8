"""kohya-ss sd-scripts network module: T-LoRA, Ortho-LoRA, TriLoRA and LoRA.

    accelerate launch train_network.py ... --network_module=networks.tlora \\
        --network_dim 64 --network_alpha 64 --network_args "algo=tlora" "min_rank=32"

--network_args (all optional):
    algo=tlora|tlora_vanilla|ortho|trilora|lora   (default tlora)
    min_rank=<int> or min_rank_ratio=<0..1>        ranks kept at the noisiest timestep (default 0.5·rank)
    rank_schedule_power=<p>                        r(t) = floor(((T-t)/T)^p · (R - r_min)) + r_min
    init=last|principal|middle, init_source=random|weight   Ortho-LoRA initialisation
    targets=transformer|attention                  what sd-scripts' LoRA adapts, or only attention q/k/v/out
    conv_dim, conv_alpha[, conv_min_rank]           also adapt 3x3 convolutions (LoCon)
    dropout, rank_dropout, module_dropout, loraplus_lr_ratio, loraplus_unet_lr_ratio,
    loraplus_text_encoder_lr_ratio                 as in sd-scripts' networks.lora
    ortho_reg=<γ>                                  TriLoRA only: γ(‖PᵀP−I‖² + ‖QQᵀ−I‖²)

This file is the thin entry point; the layer math is in tlora_layer.py, the network in
tlora_network.py and the file format in tlora_format.py.
"""

import logging

from .tlora_format import (
    ALGOS,
    METADATA_CONFIG_KEY,
    NETWORK_OPTIONS,
    NetworkConfig,
    TLoRAFormatError,
    config_from_metadata,
    detect_algo,
    group_by_layer,
    parse_network_args,
    read_metadata,
    read_safetensors,
)
from .tlora_layer import active_rank_count, mean_rank_mask, rank_mask  # noqa: F401  (public API)
from .tlora_network import TLoRANetwork, layer_ranks_from_tensors

logger = logging.getLogger(__name__)

__all__ = ["create_network", "create_network_from_weights", "TLoRANetwork", "NetworkConfig", "TLoRAFormatError"]


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """Called by sd-scripts' train_network.py with --network_dim, --network_alpha and every
    --network_args key=value (as strings; `dropout` is injected by sd-scripts itself)."""
    if kwargs.get("dropout") is None and neuron_dropout is not None:
        kwargs["dropout"] = neuron_dropout
    config, training = parse_network_args(network_dim, network_alpha, kwargs)
    return TLoRANetwork(text_encoder, unet, config, training, multiplier=multiplier)


def _config_for_file(metadata, tensors, kwargs, source) -> NetworkConfig:
    config = config_from_metadata(metadata, source)
    layers = group_by_layer(tensors)
    if not layers:
        raise TLoRAFormatError(f"{source}: the file holds no LoRA layers")
    requested_algo = kwargs.get("algo")
    if config is None:
        family = {detect_algo(keys) for keys in layers.values()}
        if family != {"lora"}:
            if requested_algo is None:
                raise TLoRAFormatError(
                    f"{source}: a file with svd_* factors but no '{METADATA_CONFIG_KEY}' metadata; pass algo=tlora|ortho|trilora "
                    f"(and min_rank=...) or import it with `python -m converters` first"
                )
            config, _ = parse_network_args(
                next(iter(layers.values()))["svd_down.weight"].shape[0], None, {k: v for k, v in kwargs.items() if k in NETWORK_OPTIONS}
            )
        else:  # a plain kohya LoRA file: load it as algo=lora
            first = next(iter(layers.values()))
            alpha = first.get("alpha")
            config = NetworkConfig(algo="lora", rank=int(first["lora_down.weight"].shape[0]), alpha=float(alpha) if alpha is not None else 0.0)
            config.min_rank = config.rank
    elif requested_algo is not None and str(requested_algo).strip().lower() != config.algo:
        raise TLoRAFormatError(f"{source}: the file was trained with algo={config.algo}, not algo={requested_algo}")
    return config


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False, **kwargs):
    """Rebuild the exact network of a file (native or plain kohya) from the file alone.

    `mask=full|mean|t=<int>` (e.g. gen_img.py --network_args "mask=mean") pins one
    time-independent rank mask instead of the per-step timestep mask.

    Returns (network, weights_sd) as sd-scripts expects; the network already holds the weights."""
    source = file if file is not None else "weights"
    if weights_sd is None:
        weights_sd, metadata = read_safetensors(file)
    else:
        metadata = read_metadata(file) if file is not None else {}
    mask_mode = kwargs.pop("mask", None)  # sampling option: timestep (default) | full | mean | t=<int>
    unknown = sorted(k for k in kwargs if k not in NETWORK_OPTIONS and k not in ("dropout", "rank_dropout", "module_dropout")
                     and not k.startswith("loraplus"))
    if unknown:
        raise TLoRAFormatError(f"network_args: unknown key(s) {', '.join(unknown)} for networks.tlora")
    config = _config_for_file(metadata, weights_sd, kwargs, source)
    if config.algo not in ALGOS:
        raise TLoRAFormatError(f"{source}: unknown algo {config.algo!r}")
    training_kwargs = {} if for_inference else {k: v for k, v in kwargs.items() if k not in NETWORK_OPTIONS}
    _, training = parse_network_args(config.rank, config.alpha, training_kwargs)
    layer_ranks = layer_ranks_from_tensors(weights_sd, config.algo)
    network = TLoRANetwork(text_encoder, unet, config, training, multiplier=multiplier, layer_ranks=layer_ranks, initialise=False)
    network.check_state_dict(weights_sd, source)
    network.load_state_dict(weights_sd, strict=False)
    try:
        network.set_fixed_mask(mask_mode)
    except ValueError as e:
        raise TLoRAFormatError(f"network_args: {e}") from None
    return network, weights_sd
