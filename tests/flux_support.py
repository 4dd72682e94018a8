"""Helpers of the FLUX.1 tests (tests/test_flux*.py): the sd-scripts stand-in and a diffusers
FluxTransformer2DModel / FluxPipeline of corresponding sizes, sd-scripts' create_network call, and
reference computations written out independently of the code under test (the r(t) formula, the
mean mask, a native file's weight change from its raw tensors, lora_flux's layer names and
ComfyUI's diffusers -> sd-scripts row map)."""

import math
from typing import Dict, List, Optional

import torch

import tiny_models as tm

# The stand-in (tests/tiny_models.Flux) and the diffusers model share these sizes, so that a file
# trained on one loads on the other: hidden 32 = 2 heads x 16, MLP ratio 4, 2 double + 2 single blocks.
HIDDEN, HEADS, HEAD_DIM, MLP = 32, 2, 16, 128
DEPTH, SINGLE = 2, 2
CONTEXT, POOLED = 24, 16  # T5 width (joint_attention_dim), CLIP width (pooled_projection_dim)
T = 1000

ALGOS = ["tlora", "tlora_vanilla", "ortho", "trilora", "lora"]
MASKED = ("tlora", "tlora_vanilla")


# ----------------------------------------------------------------------------- the formula


def formula_count(sigma: float, rank: int, min_rank: int, power: float = 1.0) -> int:
    """r(t) = floor(((T - t) / T)^p · (R - r_min)) + r_min with t = sigma · T (REFERENCE §1, §3b)."""
    t = float(sigma) * T
    return math.floor(((T - t) / T) ** power * (rank - min_rank)) + min_rank


def formula_count_t(t: float, rank: int, min_rank: int, power: float = 1.0) -> int:
    return math.floor(((T - t) / T) ** power * (rank - min_rank)) + min_rank


def mask_of_count(count: int, rank: int) -> List[float]:
    return [1.0] * count + [0.0] * (rank - count)


def mean_mask(rank: int, min_rank: int, power: float = 1.0) -> torch.Tensor:
    """m̄_i = the fraction of t in 0..T-1 at which rank i is active."""
    counts = [formula_count_t(t, rank, min_rank, power) for t in range(T)]
    return torch.tensor([sum(1 for c in counts if i < c) / T for i in range(rank)], dtype=torch.float64)


def fixed_mask(mode: str, rank: int, min_rank: int) -> Optional[torch.Tensor]:
    """The mask vector of a converter --mask (None: every rank)."""
    if mode == "full":
        return None
    if mode == "mean":
        return mean_mask(rank, min_rank)
    t = int(mode[2:])
    return torch.tensor(mask_of_count(formula_count_t(t, rank, min_rank), rank), dtype=torch.float64)


# ----------------------------------------------------------------------------- sd-scripts' call


def sd_kwargs(algo: str, **extra) -> Dict[str, object]:
    """--network_args as sd-scripts passes them: strings, plus the injected `dropout`."""
    args = {"algo": algo}
    args.update({k: str(v) for k, v in extra.items()})
    args["dropout"] = None
    return args


def create(algo, text_encoders, flux, dim=4, alpha=2.0, **extra):
    import networks.tlora as tlora

    return tlora.create_network(1.0, dim, alpha, None, text_encoders, flux, neuron_dropout=None, **sd_kwargs(algo, **extra))


def lora_flux_dit_names(depth=DEPTH, single=SINGLE, blocks="all", double_indices=None, single_indices=None) -> List[str]:
    """networks/lora_flux.py's DiT layer names (REFERENCE §3b, digest §2.1), written out."""
    names = []
    if blocks in ("all", "double"):
        for i in range(depth):
            if double_indices is not None and i not in double_indices:
                continue
            for stream in ("img", "txt"):
                for leaf in ("mod_lin", "attn_qkv", "attn_proj", "mlp_0", "mlp_2"):
                    names.append(f"lora_unet_double_blocks_{i}_{stream}_{leaf}")
    if blocks in ("all", "single"):
        for i in range(single):
            if single_indices is not None and i not in single_indices:
                continue
            for leaf in ("linear1", "linear2", "modulation_lin"):
                names.append(f"lora_unet_single_blocks_{i}_{leaf}")
    return sorted(names)


def lora_flux_te_names(clip_layers=2, t5_layers=2, t5=False) -> List[str]:
    """lora_flux names a CLIP layer by its module path under transformers 4.x (sd-scripts' pin),
    which has the `text_model.` wrapper; files keep those names under every transformers."""
    names = [f"lora_te1_text_model_encoder_layers_{l}_{leaf}" for l in range(clip_layers)
             for leaf in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")]
    if t5:
        names += [f"lora_te3_encoder_block_{l}_layer_0_SelfAttention_{p}" for l in range(t5_layers) for p in "qkvo"]
        names += [f"lora_te3_encoder_block_{l}_layer_1_DenseReluDense_{p}" for l in range(t5_layers) for p in ("wi_0", "wi_1", "wo")]
    return sorted(names)


def randomise(network, seed=0, scale=0.1):
    """'Trained' factors: every trainable tensor random (frozen copies keep their init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# ----------------------------------------------------------------------------- weight changes from raw file tensors


def native_delta(tensors: Dict[str, torch.Tensor], name: str, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """alpha/R · (up·diag(λ ⊙ m)·down − up0·diag(λ0 ⊙ m)·down0) from a native file's tensors, in
    float64 (REFERENCE §1: vanilla forms have no λ and no frozen copy)."""
    if f"{name}.svd_down.weight" in tensors:
        down, up, lam = (tensors[f"{name}.{k}"].double() for k in ("svd_down.weight", "svd_up.weight", "svd_lambda"))
    else:
        down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
        lam = torch.ones(down.shape[0], dtype=torch.float64)
    rank = down.shape[0]
    m = torch.ones(rank, dtype=torch.float64) if mask is None else mask.double()
    delta = up @ torch.diag(lam * m) @ down
    if f"{name}.svd_down_base.weight" in tensors:
        down0, up0, lam0 = (tensors[f"{name}.{k}"].double() for k in ("svd_down_base.weight", "svd_up_base.weight", "svd_lambda_base"))
        delta = delta - up0 @ torch.diag(lam0 * m) @ down0
    alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(rank)
    return delta * (alpha / rank)


def kohya_delta(tensors: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A standard kohya layer's change: alpha/r · up @ down (missing alpha: scale 1)."""
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(down.shape[0])
    return up @ down * (alpha / down.shape[0])


# ComfyUI's comfy.utils.flux_to_diffusers (digest §4.1): diffusers module -> (sd-scripts module, row offset in units of h, rows in h)
def comfy_diffusers_to_bfl(hidden=HIDDEN, mlp=MLP) -> Dict[str, tuple]:
    table = {}
    for i in range(DEPTH):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for k, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            table[d + part] = (b + "img_attn.qkv", k * hidden, hidden)
        for k, part in enumerate(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")):
            table[d + part] = (b + "txt_attn.qkv", k * hidden, hidden)
        for dpart, bpart in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"), ("ff.net.0.proj", "img_mlp.0"),
                             ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
                             ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin")):
            table[d + dpart] = (b + bpart, 0, None)
    for i in range(SINGLE):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for k, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            table[d + part] = (b + "linear1", k * hidden, hidden)
        table[d + "proj_mlp"] = (b + "linear1", 3 * hidden, mlp)
        table[d + "proj_out"] = (b + "linear2", 0, None)
        table[d + "norm.linear"] = (b + "modulation.lin", 0, None)
    return table


# ----------------------------------------------------------------------------- diffusers models


def diffusers_transformer(seed=0, in_channels=64):
    """diffusers' FluxTransformer2DModel with the stand-in's block sizes (hidden 32, 2 heads of 16,
    MLP ratio 4, 2 + 2 blocks)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=DEPTH, num_single_layers=SINGLE,
                                  attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=CONTEXT,
                                  pooled_projection_dim=POOLED, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


def diffusers_call(sigmas, seed=0, tokens=16, txt_tokens=5, in_channels=64):
    """The keyword call FluxPipeline makes (timestep = sigma)."""
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1)
    b = sigmas.shape[0]
    return dict(hidden_states=torch.randn(b, tokens, in_channels, generator=g), encoder_hidden_states=torch.randn(b, txt_tokens, CONTEXT, generator=g),
                pooled_projections=torch.randn(b, POOLED, generator=g), timestep=sigmas, img_ids=torch.rand(tokens, 3, generator=g) * 4,
                txt_ids=torch.zeros(txt_tokens, 3), guidance=torch.full((b,), 3.5), return_dict=False)


def merge_bfl_deltas(transformer, deltas: Dict[str, torch.Tensor]) -> None:
    """Add sd-scripts-layout changes ({'double_blocks.0.img_attn.qkv': [rows, in]}) into a diffusers
    transformer's weights through ComfyUI's row map."""
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for dpath, (bpath, start, rows) in comfy_diffusers_to_bfl().items():
            if bpath not in deltas:
                continue
            delta = deltas[bpath]
            part = delta if rows is None else delta[start:start + rows]
            modules[dpath].weight += part.to(modules[dpath].weight.dtype)


def t5_tokenizer():
    """A character-level T5TokenizerFast built in-process (<pad>=0, </s>=1, <unk>=2), as the sd-scripts harness does."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for c in ["\u2581"] + [chr(i) for i in range(33, 127)]:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Split(Regex("."), "isolated")])
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def tiny_pipeline(seed=0, dynamic_shift=False, shift=1.0):
    """A FluxPipeline of tiny components: the transformer above, a 16-latent-channel AutoencoderKL,
    CLIP + byte-level CLIPTokenizer, T5 + character-level T5 tokenizer, FlowMatchEulerDiscreteScheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    from tlora_trainer.tokenizers import clip_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=16, norm_num_groups=8, sample_size=16, shift_factor=0.1159, scaling_factor=0.3611).eval()
    if dynamic_shift:  # FLUX.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=tm.tiny_clip(seed, hidden=POOLED), tokenizer=clip_tokenizer(),
                        text_encoder_2=tm.tiny_t5(seed + 1, hidden=CONTEXT), tokenizer_2=t5_tokenizer(),
                        transformer=diffusers_transformer(seed))
