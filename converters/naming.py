"""Module names: kohya names (underscores) <-> dotted module paths, and the SDXL U-Net's two
layouts, sd-scripts' SGM layout (`input_blocks.4.1...`) and diffusers' (`down_blocks.1.attentions.0...`).

SGM layout of a diffusers U-Net with L = layers_per_block (the SDXL U-Net has L = 2):

    down_blocks.i.resnets.j     <-> input_blocks.(1 + i(L+1) + j).0     (conv_in is input_blocks.0.0)
    down_blocks.i.attentions.j  <-> input_blocks.(1 + i(L+1) + j).1
    down_blocks.i.downsamplers.0.conv <-> input_blocks.(1 + i(L+1) + L).0.op
    mid_block.resnets.0 / attentions.0 / resnets.1 <-> middle_block.0 / .1 / .2
    up_blocks.i.resnets.j       <-> output_blocks.(i(L+1) + j).0
    up_blocks.i.attentions.j    <-> output_blocks.(i(L+1) + j).1
    up_blocks.i.upsamplers.0.conv <-> output_blocks.(i(L+1) + L).2.conv  (.1.conv in a block without attention)
    inside resnets: conv1 <-> in_layers.2, conv2 <-> out_layers.3, time_emb_proj <-> emb_layers.1,
                    conv_shortcut <-> skip_connection
Inside transformer blocks both layouts use the same names (attn1.to_q, ff.net.0.proj, proj_in, ...).
"""

import re
from typing import Dict, Iterable, Optional

# compound names whose underscores are part of one module name (longest first when matching)
_COMPOUNDS = sorted(
    {
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
        "time_embedding", "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj",
        "k_proj", "v_proj", "out_proj", "final_layer_norm", "text_projection", "input_blocks", "middle_block",
        "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb",
        "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "layer_norm1", "layer_norm2", "position_embedding",
        "token_embedding",
    },
    key=lambda s: -s.count("_"),
)
_COMPOUND_TOKENS = [c.split("_") for c in _COMPOUNDS]

UNET_PREFIX = "lora_unet_"
TE_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te_")
DIFFUSERS_COMPONENT = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}


def split_prefix(name: str):
    """('lora_unet_', rest) / ('lora_te1_', rest) ...; raises ValueError for other names."""
    for prefix in (UNET_PREFIX,) + TE_PREFIXES:
        if name.startswith(prefix):
            return prefix, name[len(prefix):]
    raise ValueError(f"{name!r} is not a kohya LoRA module name (lora_unet_*, lora_te_*, lora_te1_*, lora_te2_*)")


def underscored_to_path(rest: str, known_paths: Optional[Iterable[str]] = None) -> str:
    """'down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q' -> 'down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q'.

    With `known_paths` (a model's module names) the answer is looked up exactly; otherwise known
    compound names are kept together and every other underscore becomes a dot."""
    if known_paths is not None:
        table = {p.replace(".", "_"): p for p in known_paths}
        if rest in table:
            return table[rest]
    tokens = rest.split("_")
    out = []
    i = 0
    while i < len(tokens):
        for compound in _COMPOUND_TOKENS:
            n = len(compound)
            if tokens[i:i + n] == compound:
                out.append("_".join(compound))
                i += n
                break
        else:
            out.append(tokens[i])
            i += 1
    return ".".join(out)


def kohya_to_diffusers_key(name: str, known_paths: Optional[Dict[str, Iterable[str]]] = None) -> str:
    """kohya module name (diffusers layout) -> '<component>.<dotted module path>' as diffusers/PEFT name it."""
    prefix, rest = split_prefix(name)
    component = DIFFUSERS_COMPONENT[prefix]
    paths = None if known_paths is None else known_paths.get(component)
    return f"{component}.{underscored_to_path(rest, paths)}"


def diffusers_key_to_kohya(key: str) -> str:
    """'unet.down_blocks.1....to_q' -> 'lora_unet_down_blocks_1_..._to_q'; two text encoders use te1/te2."""
    component, _, path = key.partition(".")
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}.get(component)
    if prefix is None:
        raise ValueError(f"{key!r}: unknown component {component!r} (expected unet, text_encoder, text_encoder_2)")
    return prefix + path.replace(".", "_")


# ----------------------------------------------------------------------------- SGM <-> diffusers (U-Net)

_RESNET_TO_SGM = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_RESNET_FROM_SGM = {v: k for k, v in _RESNET_TO_SGM.items()}


def _resnet_leaf_to_sgm(leaf: str) -> str:
    for src, dst in _RESNET_TO_SGM.items():
        if leaf == src or leaf.startswith(src + "_"):
            return dst + leaf[len(src):]
    return leaf


def _resnet_leaf_from_sgm(leaf: str) -> str:
    for src, dst in _RESNET_FROM_SGM.items():
        if leaf == src or leaf.startswith(src + "_"):
            return dst + leaf[len(src):]
    return leaf


def is_sgm_name(name: str) -> bool:
    return name.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))


def unet_name_to_sgm(name: str, layers_per_block: int = 2) -> str:
    """kohya U-Net name in diffusers layout -> SGM layout (sd-scripts' SDXL names). Others unchanged."""
    L = layers_per_block
    m = re.fullmatch(r"lora_unet_down_blocks_(\d+)_(resnets|attentions)_(\d+)_(.+)", name)
    if m:
        i, kind, j, leaf = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + i * (L + 1) + j
        if kind == "resnets":
            return f"lora_unet_input_blocks_{n}_0_{_resnet_leaf_to_sgm(leaf)}"
        return f"lora_unet_input_blocks_{n}_1_{leaf}"
    m = re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name)
    if m:
        return f"lora_unet_input_blocks_{1 + int(m[1]) * (L + 1) + L}_0_op"
    m = re.fullmatch(r"lora_unet_mid_block_(resnets|attentions)_(\d+)_(.+)", name)
    if m:
        kind, j, leaf = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"lora_unet_middle_block_1_{leaf}"
        return f"lora_unet_middle_block_{0 if j == 0 else 2}_{_resnet_leaf_to_sgm(leaf)}"
    m = re.fullmatch(r"lora_unet_up_blocks_(\d+)_(resnets|attentions)_(\d+)_(.+)", name)
    if m:
        i, kind, j, leaf = int(m[1]), m[2], int(m[3]), m[4]
        n = i * (L + 1) + j
        if kind == "resnets":
            return f"lora_unet_output_blocks_{n}_0_{_resnet_leaf_to_sgm(leaf)}"
        return f"lora_unet_output_blocks_{n}_1_{leaf}"
    m = re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name)
    if m:
        # SDXL's upsamplers all sit in blocks with attention (index 2)
        return f"lora_unet_output_blocks_{int(m[1]) * (L + 1) + L}_2_conv"
    return name


def unet_name_from_sgm(name: str, layers_per_block: int = 2) -> str:
    """kohya U-Net name in SGM layout -> diffusers layout. Names not in SGM layout are unchanged."""
    L = layers_per_block
    m = re.fullmatch(r"lora_unet_input_blocks_(\d+)_(\d+)_(.+)", name)
    if m:
        n, inner, leaf = int(m[1]), int(m[2]), m[3]
        if n == 0:
            raise ValueError(f"{name!r}: input_blocks.0 is conv_in, which no LoRA of this project adapts")
        i, j = (n - 1) // (L + 1), (n - 1) % (L + 1)
        if leaf == "op":
            return f"lora_unet_down_blocks_{i}_downsamplers_0_conv"
        if inner == 0:
            return f"lora_unet_down_blocks_{i}_resnets_{j}_{_resnet_leaf_from_sgm(leaf)}"
        return f"lora_unet_down_blocks_{i}_attentions_{j}_{leaf}"
    m = re.fullmatch(r"lora_unet_middle_block_(\d+)_(.+)", name)
    if m:
        n, leaf = int(m[1]), m[2]
        if n == 1:
            return f"lora_unet_mid_block_attentions_0_{leaf}"
        return f"lora_unet_mid_block_resnets_{0 if n == 0 else 1}_{_resnet_leaf_from_sgm(leaf)}"
    m = re.fullmatch(r"lora_unet_output_blocks_(\d+)_(\d+)_(.+)", name)
    if m:
        n, inner, leaf = int(m[1]), int(m[2]), m[3]
        i, j = n // (L + 1), n % (L + 1)
        if leaf == "conv" and inner in (1, 2):
            return f"lora_unet_up_blocks_{i}_upsamplers_0_conv"
        if inner == 0:
            return f"lora_unet_up_blocks_{i}_resnets_{j}_{_resnet_leaf_from_sgm(leaf)}"
        return f"lora_unet_up_blocks_{i}_attentions_{j}_{leaf}"
    return name


def layers_per_block_of(unet_config) -> int:
    value = getattr(unet_config, "layers_per_block", None)
    if value is None and isinstance(unet_config, dict):
        value = unet_config.get("layers_per_block")
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"layers_per_block={value}: SGM renaming needs one value for all blocks")
        value = value[0]
    return int(value if value is not None else 2)
