"""Model families: one descriptor per family, the one place that knows what a family looks like.

A family (SD 1.x, SD 2.x, SDXL, FLUX.1) says:
  * its denoiser layouts (`DenoiserLayout`): the module layout of one implementation of the
    denoiser (diffusers' U-Net, sd-scripts' SGM SDXL U-Net, sd-scripts' FLUX `Flux`, diffusers'
    `FluxTransformer2DModel`): which blocks hold the adapted layers, which of them are attention
    projections, the kohya name prefix, and how the timestep is read from the denoiser's call and
    mapped to the rank schedule's t in [0, T];
  * its text encoders (kohya prefixes, target classes, an option that switches one on);
  * its metadata (`ss_base_model_version`, `modelspec.*`), the name of its denoiser in diffusers
    pipelines (`unet` / `transformer`);
  * how layer names move between its layouts (SDXL: SGM <-> diffusers; FLUX: sd-scripts' fused
    qkv / linear1 <-> diffusers' separate projections, which splits the up factor by rows).

The network, the converters and the trainer ask this module; no family constant lives anywhere
else. Adding a family is a new descriptor in FAMILIES (and its layouts) plus its tests.

This module depends on torch only (it runs inside sd-scripts' environment).
"""

import dataclasses
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

# ----------------------------------------------------------------------------- timestep


@dataclasses.dataclass(frozen=True)
class TimestepArgument:
    """Where a denoiser's forward takes its timestep, and how it maps to the schedule's t.

    SD U-Nets get t in [0, T) itself; flow-matching DiTs get sigma in [0, 1] (1 = pure noise),
    which maps to t = sigma · T (the official T-LoRA FLUX mapping: sigma = 1 keeps min_rank
    ranks, sigma = 0 all of them)."""

    keywords: Tuple[str, ...]
    position: Optional[int]
    is_sigma: bool = False

    def schedule_t(self, values: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
        return values * num_train_timesteps if self.is_sigma else values

    def read(self, args: Sequence, kwargs: Mapping) -> Optional[torch.Tensor]:
        """The timestep argument of one call as a 1-D float64 tensor (as passed), or None."""
        value = None
        for key in self.keywords:
            if kwargs.get(key) is not None:
                value = kwargs[key]
                break
        else:
            if self.position is not None and len(args) > self.position:
                value = args[self.position]
        if value is None or isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            values = torch.tensor([float(value)], dtype=torch.float64)
        elif torch.is_tensor(value):
            values = value.detach()
            if values.device.type != "cpu":  # float64 is not on every device (mps); the mask is tiny
                values = values.cpu()
            values = values.reshape(-1).to(torch.float64)
        else:
            return None
        return values


# ----------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class DenoiserLayout:
    """One module layout of a family's denoiser."""

    name: str  # "diffusers", "sgm", "bfl" (sd-scripts' FLUX), ...
    prefix: str  # kohya prefix of its layers: lora_unet / lora_transformer
    markers: Tuple[str, ...]  # direct children that identify the layout in a model
    block_classes: Tuple[str, ...]  # blocks whose Linear / 1x1 Conv2d children are adapted
    attention_layers: Tuple[str, ...]  # child paths (suffixes) kept with targets=attention
    timestep: TimestepArgument
    conv_block_classes: Tuple[str, ...] = ()  # blocks adapted only with conv_dim (LoCon)
    block_groups: Tuple[Tuple[str, str], ...] = ()  # (path prefix regex with the index as group 1, kind): FLUX double/single

    def matches(self, denoiser) -> bool:
        children = {name for name, _ in denoiser.named_children()}
        return all(marker in children for marker in self.markers)

    def block_of(self, module_path: str) -> Optional[Tuple[str, int]]:
        """(kind, index) of the block a layer path sits in, for train_blocks / *_block_indices."""
        for pattern, kind in self.block_groups:
            m = re.match(pattern, module_path)
            if m:
                return kind, int(m.group(1))
        return None


@dataclasses.dataclass(frozen=True)
class TextEncoderSlot:
    """The text encoder at one index of the host's list: kohya prefix, adapted block classes, the
    network option that must be on for it to be adapted (None: adapted by default), and the root
    its layer names start from.

    `root`: transformers 5 dropped the `text_model` wrapper of CLIPTextModel (its modules are
    `encoder.layers.N...`, 4.x and CLIPTextModelWithProjection: `text_model.encoder.layers.N...`).
    kohya names always carry the root (`lora_te_text_model_encoder_layers_0_...`: what sd-scripts
    writes and A1111, ComfyUI and Forge map), whichever transformers built the model."""

    prefix: str
    classes: Tuple[str, ...]
    option: Optional[str] = None
    root: Optional[str] = None

    def module_path(self, text_encoder, path: str) -> str:
        """The canonical path of a module path of this text encoder."""
        if self.root is None or path.startswith(self.root + "."):
            return path
        has_root = any(name == self.root for name, _ in text_encoder.named_children())
        return path if has_root else f"{self.root}.{path}"


CLIP_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
T5_CLASSES = ("T5Attention", "T5DenseGatedActDense")

# diffusers' U-Net (also sd-scripts' own SD 1.x/2.x U-Net, which keeps diffusers' module names)
SD_UNET = DenoiserLayout(
    name="diffusers",
    prefix="lora_unet",
    markers=("down_blocks", "up_blocks"),
    block_classes=("Transformer2DModel",),
    conv_block_classes=("ResnetBlock2D", "Downsample2D", "Upsample2D"),
    attention_layers=tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")),
    # diffusers: forward(sample, timestep, ...); sd-scripts' SD U-Net: the same
    timestep=TimestepArgument(("timestep", "timesteps", "t"), 1),
)
# sd-scripts' SDXL U-Net (the SGM layout of the original implementation): forward(x, timesteps=None, ...)
SDXL_SGM = DenoiserLayout(
    name="sgm",
    prefix="lora_unet",
    markers=("input_blocks", "middle_block", "output_blocks"),
    block_classes=("Transformer2DModel",),
    conv_block_classes=("ResnetBlock2D", "Downsample2D", "Upsample2D"),
    attention_layers=SD_UNET.attention_layers,
    timestep=TimestepArgument(("timesteps", "timestep", "t"), 1),
)
# sd-scripts' FLUX.1 DiT (library.flux_models.Flux, Black Forest Labs' module names); called with
# keywords only, timesteps = sigma in [0, 1]
FLUX_BFL = DenoiserLayout(
    name="bfl",
    prefix="lora_unet",
    markers=("double_blocks", "single_blocks"),
    block_classes=("DoubleStreamBlock", "SingleStreamBlock"),
    attention_layers=("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1"),
    timestep=TimestepArgument(("timesteps",), 4, is_sigma=True),
    block_groups=((r"double_blocks\.(\d+)\.", "double"), (r"single_blocks\.(\d+)\.", "single")),
)
# diffusers' FluxTransformer2DModel: forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)
FLUX_DIFFUSERS = DenoiserLayout(
    name="diffusers",
    prefix="lora_transformer",
    markers=("transformer_blocks", "single_transformer_blocks"),
    block_classes=("FluxTransformerBlock", "FluxSingleTransformerBlock"),
    attention_layers=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                      "attn.add_v_proj", "attn.to_add_out"),
    timestep=TimestepArgument(("timestep",), 3, is_sigma=True),
    block_groups=((r"transformer_blocks\.(\d+)\.", "double"), (r"single_transformer_blocks\.(\d+)\.", "single")),
)


# ----------------------------------------------------------------------------- families


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # sd1 | sd2 | sdxl | flux
    title: str
    layouts: Tuple[DenoiserLayout, ...]  # the first is the layout sd-scripts trains and kohya files use
    text_encoders: Tuple[TextEncoderSlot, ...]
    base_model_version: str  # ss_base_model_version
    architecture_name: str  # modelspec.architecture without the "/lora" suffix
    implementation: str  # modelspec.implementation
    resolution: str
    diffusers_denoiser: str  # the pipeline attribute / PEFT component of the denoiser
    flow_matching: bool = False
    v_architecture_name: Optional[str] = None  # modelspec.architecture of the v-prediction variant
    official_hub_id: str = ""  # for model cards

    @property
    def file_layout(self) -> DenoiserLayout:
        return self.layouts[0]

    def layout(self, name: str) -> DenoiserLayout:
        for layout in self.layouts:
            if layout.name == name:
                return layout
        raise KeyError(f"{self.title} has no {name!r} layout; it has {', '.join(lay.name for lay in self.layouts)}")

    def layout_of_model(self, denoiser) -> Optional[DenoiserLayout]:
        for layout in self.layouts:
            if layout.matches(denoiser):
                return layout
        return None

    def architecture(self, v_parameterization: bool = False) -> str:
        if v_parameterization and self.v_architecture_name:
            return self.v_architecture_name
        return self.architecture_name

    def text_encoder_slots(self, count: int) -> List[TextEncoderSlot]:
        if count > len(self.text_encoders):
            raise ValueError(f"{self.title} has {len(self.text_encoders)} text encoder(s), the host passed {count}")
        return list(self.text_encoders[:count])

    def lora_metadata(self, v_parameterization: bool = False) -> Dict[str, str]:
        """The metadata loaders use to classify a LoRA of this family (sd-scripts' keys)."""
        return {
            "ss_base_model_version": self.base_model_version,
            "ss_v2": str(self.name == "sd2"),
            "modelspec.architecture": f"{self.architecture(v_parameterization)}/lora",
            "modelspec.implementation": self.implementation,
            "modelspec.resolution": self.resolution,
        }

    def denoiser_prefixes(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys(layout.prefix for layout in self.layouts))

    def diffusers_component(self, prefix: str) -> str:
        """PEFT component in diffusers pipelines of the layers with this kohya prefix."""
        if prefix in self.denoiser_prefixes():
            return self.diffusers_denoiser
        for index, slot in enumerate(self.text_encoders):
            if slot.prefix == prefix:
                return "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        raise KeyError(f"{prefix!r} is not a layer prefix of {self.title}")


_SD_IMPL = "diffusers"
_SGM_IMPL = "https://github.com/Stability-AI/generative-models"

SD1 = Family(
    name="sd1", title="SD 1.x", layouts=(SD_UNET,), text_encoders=(TextEncoderSlot("lora_te", CLIP_CLASSES, root="text_model"),),
    base_model_version="sd_v1", architecture_name="stable-diffusion-v1", implementation=_SD_IMPL, resolution="512x512",
    diffusers_denoiser="unet", official_hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
)
SD2 = Family(
    name="sd2", title="SD 2.x", layouts=(SD_UNET,), text_encoders=(TextEncoderSlot("lora_te", CLIP_CLASSES, root="text_model"),),
    base_model_version="sd_v2", architecture_name="stable-diffusion-v2-512", implementation=_SD_IMPL, resolution="512x512",
    diffusers_denoiser="unet", v_architecture_name="stable-diffusion-v2-768-v", official_hub_id="stabilityai/stable-diffusion-2-1-base",
)
SDXL = Family(
    name="sdxl", title="SDXL", layouts=(SDXL_SGM, SD_UNET),
    text_encoders=(TextEncoderSlot("lora_te1", CLIP_CLASSES, root="text_model"), TextEncoderSlot("lora_te2", CLIP_CLASSES, root="text_model")),
    base_model_version="sdxl_base_v1-0", architecture_name="stable-diffusion-xl-v1-base", implementation=_SGM_IMPL,
    resolution="1024x1024", diffusers_denoiser="unet", official_hub_id="stabilityai/stable-diffusion-xl-base-1.0",
)
FLUX = Family(
    name="flux", title="FLUX.1", layouts=(FLUX_BFL, FLUX_DIFFUSERS),
    text_encoders=(TextEncoderSlot("lora_te1", CLIP_CLASSES, root="text_model"), TextEncoderSlot("lora_te3", T5_CLASSES, option="train_t5xxl")),
    base_model_version="flux1", architecture_name="flux-1-dev", implementation="https://github.com/black-forest-labs/flux",
    resolution="1024x1024", diffusers_denoiser="transformer", flow_matching=True, official_hub_id="black-forest-labs/FLUX.1-dev",
)

FAMILIES: Dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL, FLUX)}
FAMILY_NAMES = tuple(FAMILIES)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


# ----------------------------------------------------------------------------- recognising a model


def _cross_attention_width(denoiser) -> Optional[int]:
    for name, module in denoiser.named_modules():
        if name.endswith("attn2.to_k") and hasattr(module, "in_features"):
            return int(module.in_features)
    return None


def family_of_model(denoiser, text_encoders: Sequence = ()) -> Optional[Family]:
    """The family of a denoiser (a U-Net / DiT nn.Module), from its module layout; SD 1.x, 2.x
    and XL share the U-Net layout and are told apart by their conditioning."""
    if denoiser is None:
        return None
    if FLUX_BFL.matches(denoiser) or FLUX_DIFFUSERS.matches(denoiser):
        return FLUX
    if SDXL_SGM.matches(denoiser):
        return SDXL
    if SD_UNET.matches(denoiser):
        config = getattr(denoiser, "config", None)
        addition = getattr(config, "addition_embed_type", None) if config is not None else None
        if addition == "text_time" or len([t for t in text_encoders if t is not None]) == 2:
            return SDXL
        width = _cross_attention_width(denoiser)
        if width == 2048:
            return SDXL
        return SD2 if width == 1024 else SD1
    return None


def layout_of_model(denoiser) -> Tuple[Optional[Family], Optional[DenoiserLayout]]:
    family = family_of_model(denoiser)
    return (family, family.layout_of_model(denoiser)) if family is not None else (None, None)


def describe_supported() -> str:
    return "; ".join(
        f"{family.title}: " + ", ".join(f"{layout.name} ({'/'.join(layout.markers)})" for layout in family.layouts)
        for family in FAMILIES.values()
    )


# ----------------------------------------------------------------------------- recognising a file


def families_of_layers(names: Iterable[str], shapes: Mapping[str, Tuple[int, ...]], metadata: Mapping[str, str]) -> Tuple[Family, ...]:
    """The families a LoRA file can be for, from its metadata and its layers' names and shapes
    (down factor shapes by layer name); the most likely first. Metadata is trusted when it names
    a family the layers do not contradict."""
    names = list(names)
    evidence = _families_from_names(names, shapes)
    claimed = _family_from_metadata(metadata)
    if claimed is not None and claimed in evidence:
        return (claimed,) + tuple(f for f in evidence if f is not claimed)
    return evidence


def _family_from_metadata(metadata: Mapping[str, str]) -> Optional[Family]:
    version = str(metadata.get("ss_base_model_version") or "").lower()
    arch = str(metadata.get("modelspec.architecture") or "").lower()
    if version.startswith("flux") or arch.startswith(("flux-1", "chroma")):
        return FLUX
    if "sdxl" in version or arch.startswith("stable-diffusion-xl"):
        return SDXL
    if version.startswith("sd_v2") or arch.startswith("stable-diffusion-v2") or metadata.get("ss_v2") == "True":
        return SD2
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return SD1
    return None


def _families_from_names(names: List[str], shapes: Mapping[str, Tuple[int, ...]]) -> Tuple[Family, ...]:
    if any(n.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_transformer_")) for n in names) or any(
        n.startswith("lora_te3_") for n in names
    ):
        return (FLUX,)
    if any(is_sgm_name(n) for n in names) or any(n.startswith("lora_te2_") for n in names):
        return (SDXL,)
    widths = {shapes[n][1] for n in names if n.endswith("attn2_to_k") and n in shapes and len(shapes[n]) >= 2}
    if widths & {2048}:
        return (SDXL,)
    if widths & {1024}:
        return (SD2,)
    if widths & {768}:
        return (SD1,)
    if any(n.startswith("lora_te1_") for n in names):
        return (SDXL,)
    unet = [n for n in names if n.startswith("lora_unet_")]
    if unet and not any(n.startswith("lora_unet_down_blocks_0_attentions") for n in unet) and any(
        n.startswith("lora_unet_down_blocks_1_attentions") for n in unet
    ):
        return (SDXL, SD1, SD2)  # SDXL has no attention in its first down block
    return (SD1, SD2, SDXL)


# ----------------------------------------------------------------------------- kohya names


def kohya_name(prefix: str, module_path: str) -> str:
    """sd-scripts' layer name: prefix + module path with '.' -> '_'."""
    return f"{prefix}_{module_path}".replace(".", "_")


LAYER_PREFIXES = ("lora_unet", "lora_transformer", "lora_te1", "lora_te2", "lora_te3", "lora_te")


def split_prefix(name: str) -> Tuple[str, str]:
    """('lora_unet', rest) / ('lora_te1', rest) ...; raises ValueError for other names."""
    for prefix in LAYER_PREFIXES:
        if name.startswith(prefix + "_"):
            return prefix, name[len(prefix) + 1:]
    raise ValueError(f"{name!r} is not a kohya LoRA layer name (lora_unet_*, lora_transformer_*, lora_te_*, lora_te1_/2_/3_*)")


def is_denoiser_layer(name: str) -> bool:
    return name.startswith(("lora_unet_", "lora_transformer_"))


# Module names that contain underscores, kept whole when a kohya name is turned back into a
# dotted module path without a model at hand (longest first).
_COMPOUND_NAMES = sorted(
    {
        # diffusers U-Net
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out",
        "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding", "linear_1", "linear_2",
        "add_embedding",
        # sd-scripts' SGM U-Net
        "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed",
        "label_emb",
        # CLIP
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "text_projection", "layer_norm1",
        "layer_norm2", "position_embedding", "token_embedding",
        # diffusers FLUX
        "single_transformer_blocks", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "norm1_context",
        "proj_mlp", "x_embedder", "context_embedder", "time_text_embed", "norm_out",
        # sd-scripts FLUX
        "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
        # T5
        "wi_0", "wi_1",
    },
    key=lambda s: -s.count("_"),
)
_COMPOUND_TOKENS = [c.split("_") for c in _COMPOUND_NAMES]


def module_path(rest: str, known_paths: Optional[Iterable[str]] = None) -> str:
    """'down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q' -> 'down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q'.

    With `known_paths` (a model's module names) the answer is looked up exactly; otherwise the
    known compound module names are kept together and every other underscore becomes a dot."""
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


# ----------------------------------------------------------------------------- SDXL: SGM <-> diffusers
#
# SGM layout of a diffusers U-Net with L = layers_per_block (SDXL: L = 2):
#   down_blocks.i.resnets.j     <-> input_blocks.(1 + i(L+1) + j).0     (conv_in is input_blocks.0.0)
#   down_blocks.i.attentions.j  <-> input_blocks.(1 + i(L+1) + j).1
#   down_blocks.i.downsamplers.0.conv <-> input_blocks.(1 + i(L+1) + L).0.op
#   mid_block.resnets.0 / attentions.0 / resnets.1 <-> middle_block.0 / .1 / .2
#   up_blocks.i.resnets.j       <-> output_blocks.(i(L+1) + j).0
#   up_blocks.i.attentions.j    <-> output_blocks.(i(L+1) + j).1
#   up_blocks.i.upsamplers.0.conv <-> output_blocks.(i(L+1) + L).2.conv  (.1.conv in a block without attention)
#   inside resnets: conv1 <-> in_layers.2, conv2 <-> out_layers.3, time_emb_proj <-> emb_layers.1,
#                   conv_shortcut <-> skip_connection
# Inside transformer blocks both layouts use the same names (attn1.to_q, ff.net.0.proj, proj_in, ...).

SDXL_LAYERS_PER_BLOCK = 2
_RESNET_TO_SGM = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_RESNET_FROM_SGM = {v: k for k, v in _RESNET_TO_SGM.items()}


def _swap_leaf(leaf: str, table: Mapping[str, str]) -> str:
    for src, dst in table.items():
        if leaf == src or leaf.startswith(src + "_"):
            return dst + leaf[len(src):]
    return leaf


def is_sgm_name(name: str) -> bool:
    return name.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))


def check_layers_per_block(layers_per_block) -> int:
    if isinstance(layers_per_block, bool) or not isinstance(layers_per_block, int) or layers_per_block < 1:
        raise ValueError(f"layers per block must be a whole number >= 1 (SDXL: {SDXL_LAYERS_PER_BLOCK}), got {layers_per_block!r}")
    return layers_per_block


def unet_name_to_sgm(name: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> str:
    """kohya U-Net name in diffusers layout -> SGM layout (sd-scripts' SDXL names). Others unchanged."""
    L = check_layers_per_block(layers_per_block)
    m = re.fullmatch(r"lora_unet_down_blocks_(\d+)_(resnets|attentions)_(\d+)_(.+)", name)
    if m:
        i, kind, j, leaf = int(m[1]), m[2], int(m[3]), m[4]
        if j >= L:
            raise ValueError(f"{name!r}: block index {j} does not exist with {L} layers per block")
        n = 1 + i * (L + 1) + j
        if kind == "resnets":
            return f"lora_unet_input_blocks_{n}_0_{_swap_leaf(leaf, _RESNET_TO_SGM)}"
        return f"lora_unet_input_blocks_{n}_1_{leaf}"
    m = re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name)
    if m:
        return f"lora_unet_input_blocks_{1 + int(m[1]) * (L + 1) + L}_0_op"
    m = re.fullmatch(r"lora_unet_mid_block_(resnets|attentions)_(\d+)_(.+)", name)
    if m:
        kind, j, leaf = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"lora_unet_middle_block_1_{leaf}"
        return f"lora_unet_middle_block_{0 if j == 0 else 2}_{_swap_leaf(leaf, _RESNET_TO_SGM)}"
    m = re.fullmatch(r"lora_unet_up_blocks_(\d+)_(resnets|attentions)_(\d+)_(.+)", name)
    if m:
        i, kind, j, leaf = int(m[1]), m[2], int(m[3]), m[4]
        if j > L:
            raise ValueError(f"{name!r}: block index {j} does not exist with {L} layers per block")
        n = i * (L + 1) + j
        if kind == "resnets":
            return f"lora_unet_output_blocks_{n}_0_{_swap_leaf(leaf, _RESNET_TO_SGM)}"
        return f"lora_unet_output_blocks_{n}_1_{leaf}"
    m = re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name)
    if m:
        # SDXL's upsamplers all sit in blocks with attention (index 2)
        return f"lora_unet_output_blocks_{int(m[1]) * (L + 1) + L}_2_conv"
    return name


def unet_name_from_sgm(name: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> str:
    """kohya U-Net name in SGM layout -> diffusers layout. Names not in SGM layout are unchanged."""
    L = check_layers_per_block(layers_per_block)
    m = re.fullmatch(r"lora_unet_input_blocks_(\d+)_(\d+)_(.+)", name)
    if m:
        n, inner, leaf = int(m[1]), int(m[2]), m[3]
        if n == 0:
            raise ValueError(f"{name!r}: input_blocks.0 is conv_in, which no LoRA of this project adapts")
        i, j = (n - 1) // (L + 1), (n - 1) % (L + 1)
        if leaf == "op":
            return f"lora_unet_down_blocks_{i}_downsamplers_0_conv"
        if inner == 0:
            return f"lora_unet_down_blocks_{i}_resnets_{j}_{_swap_leaf(leaf, _RESNET_FROM_SGM)}"
        return f"lora_unet_down_blocks_{i}_attentions_{j}_{leaf}"
    m = re.fullmatch(r"lora_unet_middle_block_(\d+)_(.+)", name)
    if m:
        n, leaf = int(m[1]), m[2]
        if n == 1:
            return f"lora_unet_mid_block_attentions_0_{leaf}"
        return f"lora_unet_mid_block_resnets_{0 if n == 0 else 1}_{_swap_leaf(leaf, _RESNET_FROM_SGM)}"
    m = re.fullmatch(r"lora_unet_output_blocks_(\d+)_(\d+)_(.+)", name)
    if m:
        n, inner, leaf = int(m[1]), int(m[2]), m[3]
        i, j = n // (L + 1), n % (L + 1)
        if leaf == "conv" and inner in (1, 2):
            return f"lora_unet_up_blocks_{i}_upsamplers_0_conv"
        if inner == 0:
            return f"lora_unet_up_blocks_{i}_resnets_{j}_{_swap_leaf(leaf, _RESNET_FROM_SGM)}"
        return f"lora_unet_up_blocks_{i}_attentions_{j}_{leaf}"
    return name


def layers_per_block_of(denoiser_config) -> int:
    """layers_per_block of a diffusers U-Net config (object or dict); SDXL's 2 when absent."""
    value = getattr(denoiser_config, "layers_per_block", None)
    if value is None and isinstance(denoiser_config, Mapping):
        value = denoiser_config.get("layers_per_block")
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"layers_per_block={value}: SGM renaming needs one value for all blocks")
        value = value[0]
    return int(value if value is not None else SDXL_LAYERS_PER_BLOCK)


# ----------------------------------------------------------------------------- FLUX: sd-scripts (BFL) <-> diffusers
#
# sd-scripts fuses projections that diffusers keeps apart: a double block's img_attn.qkv holds the
# rows of to_q, to_k, to_v (equal thirds), txt_attn.qkv those of add_q/k/v_proj, and a single
# block's linear1 the rows of to_q, to_k, to_v and proj_mlp (h, h, h, mlp). An adapter of a fused
# layer is the adapters of its parts with the same down factor(s) and the up factor(s) cut by rows,
# exactly, whatever the rank mask (the mask acts on the rank dimension, not the rows).

_FLUX_DOUBLE = {  # BFL leaf -> diffusers leaf(s)
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}


@dataclasses.dataclass(frozen=True)
class RowSplit:
    """One part of a fused layer: the diffusers module and its rows of the fused output."""

    path: str
    start: int
    rows: int


def flux_split_rows(fused_rows: int, parts: int, hidden: Optional[int] = None) -> List[Tuple[int, int]]:
    """(start, rows) of each part: qkv in equal thirds; linear1 as h, h, h, rest (h = hidden, or
    fused_rows / 7 for FLUX's MLP ratio of 4)."""
    if parts == 1:
        return [(0, fused_rows)]
    if parts == 3:
        if fused_rows % 3:
            raise ValueError(f"a fused qkv layer has {fused_rows} rows, not a multiple of 3")
        h = fused_rows // 3
        return [(0, h), (h, h), (2 * h, h)]
    if hidden is None:
        if fused_rows % 7:
            raise ValueError(f"linear1 has {fused_rows} rows; give the hidden size (FLUX.1: 3 x hidden + 4 x hidden rows)")
        hidden = fused_rows // 7
    if fused_rows <= 3 * hidden:
        raise ValueError(f"linear1 has {fused_rows} rows, too few for hidden size {hidden}")
    return [(0, hidden), (hidden, hidden), (2 * hidden, hidden), (3 * hidden, fused_rows - 3 * hidden)]


def flux_bfl_to_diffusers(path: str, fused_rows: int, hidden: Optional[int] = None) -> List[RowSplit]:
    """The diffusers modules (with their rows) of one sd-scripts FLUX layer path."""
    m = re.fullmatch(r"double_blocks\.(\d+)\.(.+)", path)
    if m and m[2] in _FLUX_DOUBLE:
        parts = _FLUX_DOUBLE[m[2]]
        base = f"transformer_blocks.{m[1]}."
    else:
        m = re.fullmatch(r"single_blocks\.(\d+)\.(.+)", path)
        if not (m and m[2] in _FLUX_SINGLE):
            raise ValueError(f"{path!r} is not a FLUX double/single block layer sd-scripts adapts")
        parts = _FLUX_SINGLE[m[2]]
        base = f"single_transformer_blocks.{m[1]}."
    rows = flux_split_rows(fused_rows, len(parts), hidden)
    return [RowSplit(base + leaf, start, count) for leaf, (start, count) in zip(parts, rows)]


def flux_diffusers_to_bfl(path: str) -> Tuple[str, int, int]:
    """(sd-scripts path, index of this part, number of parts) of a diffusers FLUX module path."""
    for pattern, table, base in ((r"transformer_blocks\.(\d+)\.(.+)", _FLUX_DOUBLE, "double_blocks"),
                                 (r"single_transformer_blocks\.(\d+)\.(.+)", _FLUX_SINGLE, "single_blocks")):
        m = re.fullmatch(pattern, path)
        if not m:
            continue
        for bfl_leaf, parts in table.items():
            if m[2] in parts:
                return f"{base}.{m[1]}.{bfl_leaf}", parts.index(m[2]), len(parts)
    raise ValueError(f"{path!r} is not a diffusers FLUX block layer with an sd-scripts counterpart")


def flux_bfl_path(rest: str) -> str:
    """'double_blocks_0_img_attn_qkv' -> 'double_blocks.0.img_attn.qkv' (sd-scripts FLUX names)."""
    m = re.fullmatch(r"(double|single)_blocks_(\d+)_(.+)", rest)
    if m:
        table = _FLUX_DOUBLE if m[1] == "double" else _FLUX_SINGLE
        for leaf in table:
            if leaf.replace(".", "_") == m[3]:
                return f"{m[1]}_blocks.{m[2]}.{leaf}"
    return module_path(rest)


# ----------------------------------------------------------------------------- native tensors between layouts


def _split_layer_tensors(tensors: Mapping[str, torch.Tensor], start: int, rows: int) -> Dict[str, torch.Tensor]:
    """The tensors of one row part of a layer: up factors (and their frozen copies) cut by rows,
    everything on the rank dimension or the input side shared."""
    out = {}
    for suffix, value in tensors.items():
        if suffix in ("lora_up.weight", "svd_up.weight", "svd_up_base.weight"):
            out[suffix] = value[start:start + rows].clone()
        else:
            out[suffix] = value.clone()
    return out


def to_model_layout(layers: Mapping[str, Mapping[str, torch.Tensor]], family: Family, layout: DenoiserLayout,
                    layers_per_block: int = SDXL_LAYERS_PER_BLOCK, hidden: Optional[int] = None) -> Dict[str, Dict[str, torch.Tensor]]:
    """A file's layers ({name: {suffix: tensor}}) renamed (and for FLUX split) into `layout`, so
    that a network built over a model of that layout can load them. Denoiser layers already in
    `layout` and text-encoder layers pass through."""
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensors in layers.items():
        if family is SDXL and layout is SD_UNET and is_sgm_name(name):
            out[unet_name_from_sgm(name, layers_per_block)] = dict(tensors)
        elif family is SDXL and layout is SDXL_SGM and name.startswith("lora_unet_") and not is_sgm_name(name):
            out[unet_name_to_sgm(name, layers_per_block)] = dict(tensors)
        elif family is FLUX and layout is FLUX_DIFFUSERS and name.startswith(FLUX_BFL.prefix + "_"):
            path = flux_bfl_path(name[len(FLUX_BFL.prefix) + 1:])
            up = tensors.get("lora_up.weight", tensors.get("svd_up.weight"))
            if up is None:
                raise ValueError(f"layer {name!r} has no up factor")
            for part in flux_bfl_to_diffusers(path, int(up.shape[0]), hidden):
                out[kohya_name(FLUX_DIFFUSERS.prefix, part.path)] = _split_layer_tensors(tensors, part.start, part.rows)
        elif family is FLUX and layout is FLUX_BFL and name.startswith(FLUX_DIFFUSERS.prefix + "_"):
            raise ValueError(
                f"layer {name!r} is in diffusers' FLUX layout (separate q/k/v); a timestep-aware network over sd-scripts' fused "
                f"layers cannot hold it. Convert the file to a standard LoRA (tlora-convert to-kohya) for sd-scripts' names"
            )
        else:
            out[name] = dict(tensors)
    return out
