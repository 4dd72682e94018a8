"""kohya-ss sd-scripts network module: T-LoRA, Ortho-LoRA, TriLoRA and LoRA for SD 1.x/2.x, SDXL
and FLUX.1.

    accelerate launch train_network.py ... --network_module=networks.tlora \\
        --network_dim 64 --network_alpha 64 --network_args "algo=tlora" "min_rank=32"
    accelerate launch flux_train_network.py ... --network_module=networks.tlora \\
        --network_dim 32 --network_alpha 32 --network_args "algo=tlora_vanilla" "min_rank=1"

--network_args: every option, its values and default are declared once in tlora_options.py
(`python -m networks.tlora_options` prints the table); the most used:
    algo=tlora|tlora_vanilla|ortho|trilora|lora   (default tlora)
    min_rank=<int> or min_rank_ratio=<0..1>        ranks kept at the noisiest timestep (default 0.5·rank)
    targets=transformer|attention                  what sd-scripts' LoRA adapts, or only the attention projections
    FLUX: train_blocks, train_double_block_indices, train_single_block_indices, split_qkv, train_t5xxl (as lora_flux)

Which layers a model has and how its timestep is read come from its family descriptor
(tlora_families.py); the layer math is in tlora_layer.py, the network in tlora_network.py and the
file format in tlora_format.py.
"""

import logging

from .tlora_format import (
    ALGOS,
    NETWORK_OPTIONS,
    TRAINING_OPTIONS,
    NetworkConfig,
    TLoRAFormatError,
    parse_network_args,
    read_metadata,
    read_safetensors,
    validate_native,
)
from .tlora_layer import active_rank_count, mean_rank_mask, parse_mask_mode, rank_mask  # noqa: F401  (public API)
from .tlora_network import TLoRANetwork, layer_ranks_from_tensors

logger = logging.getLogger(__name__)

__all__ = ["create_network", "create_network_from_weights", "TLoRANetwork", "NetworkConfig", "TLoRAFormatError"]


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """Called by sd-scripts' train_network.py (and sdxl_/flux_train_network.py) with --network_dim,
    --network_alpha and every --network_args key=value (as strings; `dropout` is injected by
    sd-scripts itself). `text_encoder` is one model, or a list (SDXL: two CLIPs; FLUX: CLIP-L, T5)."""
    if kwargs.get("dropout") is None and neuron_dropout is not None:
        kwargs["dropout"] = neuron_dropout
    config, training = parse_network_args(network_dim, network_alpha, kwargs)
    return TLoRANetwork(text_encoder, unet, config, training, multiplier=multiplier)


def _config_for_file(metadata, tensors, kwargs, source) -> NetworkConfig:
    """The network config of a file: its stored config, or for a file without one (plain kohya,
    or svd_* factors with algo=... given) one built from its tensors."""
    requested_algo = kwargs.get("algo")
    try:
        config, algo, layers = validate_native(tensors, metadata, source)
    except TLoRAFormatError as e:
        if requested_algo is None or "svd_* factors without" not in str(e):
            raise
        # svd_* factors without a stored config: the caller names the algo (and min_rank)
        config, _ = parse_network_args(
            _first_rank(tensors), None,
            {k: v for k, v in kwargs.items() if k in NETWORK_OPTIONS},
        )
        validate_native(tensors, metadata_with(metadata, config), source)
        return config
    if config is None:  # a plain kohya LoRA file: load it as algo=lora
        first = next(iter(layers.values()))
        alpha = first.get("alpha")
        config = NetworkConfig(algo="lora", rank=int(first["lora_down.weight"].shape[0]), alpha=float(alpha) if alpha is not None else 0.0)
        config.min_rank = config.rank
        if any(name.startswith("lora_transformer_") for name in layers):
            config.split_qkv = True  # diffusers-named parts of fused FLUX layers
    elif requested_algo is not None and str(requested_algo).strip().lower() != config.algo:
        raise TLoRAFormatError(f"{source}: the file was trained with algo={config.algo}, not algo={requested_algo}")
    return config


def _first_rank(tensors) -> int:
    for key, value in tensors.items():
        if key.endswith(("svd_down.weight", "lora_down.weight")):
            return int(value.shape[0])
    raise TLoRAFormatError("the file holds no down factor")


def metadata_with(metadata, config: NetworkConfig):
    from .tlora_format import build_metadata

    return build_metadata(config, metadata)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False, **kwargs):
    """Rebuild the exact network of a file (native or plain kohya) from the file alone.

    `mask=full|mean|t=<int>` (e.g. gen_img.py --network_args "mask=mean") pins one
    time-independent rank mask instead of the per-step timestep mask.

    Returns (network, weights_sd) as sd-scripts expects; the network already holds the weights."""
    source = file if file is not None else "weights"
    metadata = kwargs.pop("metadata", None)  # callers that changed the file's tensors (layouts) pass its checked metadata
    if weights_sd is None:
        weights_sd, metadata = read_safetensors(file)
    elif metadata is None:
        metadata = read_metadata(file) if file is not None else {}
    mask_mode = kwargs.pop("mask", None)  # sampling option: timestep (default) | full | mean | t=<int>
    try:
        mask_mode = parse_mask_mode(mask_mode)
    except ValueError as e:
        raise TLoRAFormatError(f"network_args: {e}") from None
    unknown = sorted(k for k in kwargs if k not in NETWORK_OPTIONS and k not in TRAINING_OPTIONS)
    if unknown:
        raise TLoRAFormatError(f"network_args: unknown key(s) {', '.join(unknown)} for networks.tlora")
    config = _config_for_file(metadata, weights_sd, kwargs, source)
    if config.algo not in ALGOS:
        raise TLoRAFormatError(f"{source}: unknown algo {config.algo!r}")
    training_kwargs = {} if for_inference else {k: v for k, v in kwargs.items() if k in TRAINING_OPTIONS}
    _, training = parse_network_args(config.rank, config.alpha, training_kwargs)
    layer_ranks = layer_ranks_from_tensors(weights_sd, config.algo)
    network = TLoRANetwork(text_encoder, unet, config, training, multiplier=multiplier, layer_ranks=layer_ranks, initialise=False)
    network.check_state_dict(weights_sd, source)
    network.load_state_dict(weights_sd, strict=False)
    if mask_mode is not None and mask_mode.startswith("t="):
        if not network.config.spec.masked:
            raise TLoRAFormatError(f"network_args: mask={mask_mode} needs a timestep-masked file; this one is algo={config.algo}")
        if int(mask_mode[2:]) >= config.num_train_timesteps:
            raise TLoRAFormatError(f"network_args: mask={mask_mode} is outside 0..{config.num_train_timesteps - 1}")
    network.set_fixed_mask(mask_mode)
    return network, weights_sd
