"""Helpers for the converters tests: tiny diffusers pipelines built offline, native files with
random (non-zero) factors. No tests in here."""

import os

import torch

import networks.tlora as tlora
from tiny_models import CROSS_DIM, sd1_models, sdxl_added_cond, sdxl_models

ALGOS = ("tlora", "tlora_vanilla", "ortho", "trilora", "lora")
RANK, MIN_RANK, ALPHA = 4, 2, 2.0


def tiny_tokenizer(folder):
    """A CLIPTokenizer from a byte-level vocab with no merges (every character is a token)."""
    from tlora_trainer.tokenizers import clip_tokenizer

    return clip_tokenizer()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
    ).eval()


def tiny_pipeline(family, folder, seed=0, scheduler=None):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = scheduler or EulerDiscreteScheduler()
    tokenizer = tiny_tokenizer(os.path.join(folder, "tokenizer"))
    if family == "sd1":
        (te,), unet = sd1_models(seed)
        return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    (te1, te2), unet = sdxl_models(seed)
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)


def text_encoders(pipe):
    return [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]


def randomise(network, seed=1, size=0.3):
    """Give every factor random values (P, Q, λ differ from the frozen copies), so the change is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in network.state_dict(keep_vars=True).items():
            if name.endswith(".alpha"):
                continue
            tensor.add_(torch.randn(tensor.shape, generator=g) * size)


def make_native(pipe, algo, path, seed=1, with_te=True, conv=False):
    """A native file of `algo` over the pipeline's U-Net (and text encoders) with random factors."""
    kwargs = {"algo": algo}
    if algo != "lora":
        kwargs["min_rank"] = str(MIN_RANK)
    if conv:
        kwargs["conv_dim"] = "4"
        kwargs["conv_alpha"] = "2"
    tes = text_encoders(pipe) if with_te else []
    net = tlora.create_network(1.0, RANK, ALPHA, None, tes, pipe.unet, **kwargs)
    randomise(net, seed)
    net.save_weights(path, None, {"ss_base_model_version": "sdxl_base_v1-0" if hasattr(pipe, "text_encoder_2") else "sd_v1"})
    return path


def unet_inputs(pipe, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    sdxl = hasattr(pipe, "text_encoder_2")
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    context = torch.randn(batch, 7, 2 * CROSS_DIM if sdxl else CROSS_DIM, generator=g)
    kwargs = {"encoder_hidden_states": context}
    if sdxl:
        kwargs["added_cond_kwargs"] = sdxl_added_cond(batch, seed)
    return latents, kwargs


@torch.no_grad()
def unet_out(pipe, t, batch=2, seed=3):
    latents, kwargs = unet_inputs(pipe, batch, seed)
    return pipe.unet(latents, t, **kwargs).sample


@torch.no_grad()
def te_out(pipe):
    ids = torch.arange(3, 3 + 9)[None]
    return [te(ids)[0] for te in text_encoders(pipe)]


def lora_module_count(model):
    """Modules that diffusers/PEFT equipped with a LoRA adapter."""
    return sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A")) > 0)


# SGM names of the tiny SDXL U-Net (layers_per_block=1; down: Down, CrossAttnDown; up: CrossAttnUp, Up),
# written out by hand from the SGM layout, as an independent table for the naming tests.
TINY_SDXL_SGM = {
    "down_blocks_1_attentions_0": "input_blocks_3_1",
    "mid_block_attentions_0": "middle_block_1",
    "up_blocks_0_attentions_0": "output_blocks_0_1",
    "up_blocks_0_attentions_1": "output_blocks_1_1",
}
# real SDXL (layers_per_block=2), from sd-scripts' SDXL U-Net layout
REAL_SDXL_SGM = {
    "down_blocks_1_attentions_0": "input_blocks_4_1",
    "down_blocks_1_attentions_1": "input_blocks_5_1",
    "down_blocks_2_attentions_0": "input_blocks_7_1",
    "down_blocks_2_attentions_1": "input_blocks_8_1",
    "mid_block_attentions_0": "middle_block_1",
    "up_blocks_0_attentions_0": "output_blocks_0_1",
    "up_blocks_0_attentions_2": "output_blocks_2_1",
    "up_blocks_1_attentions_0": "output_blocks_3_1",
    "up_blocks_1_attentions_2": "output_blocks_5_1",
    "down_blocks_0_resnets_1_conv1": "input_blocks_2_0_in_layers_2",
    "down_blocks_1_resnets_0_conv_shortcut": "input_blocks_4_0_skip_connection",
    "down_blocks_0_downsamplers_0_conv": "input_blocks_3_0_op",
    "down_blocks_1_downsamplers_0_conv": "input_blocks_6_0_op",
    "mid_block_resnets_1_conv2": "middle_block_2_out_layers_3",
    "up_blocks_0_upsamplers_0_conv": "output_blocks_2_2_conv",
    "up_blocks_1_upsamplers_0_conv": "output_blocks_5_2_conv",
    "up_blocks_2_resnets_2_time_emb_proj": "output_blocks_8_0_emb_layers_1",
}


def to_sgm_by_table(tensors, table):
    out = {}
    for key, value in tensors.items():
        new = key
        for src, dst in table.items():
            if key.startswith("lora_unet_" + src + "_"):
                new = "lora_unet_" + dst + key[len("lora_unet_" + src):]
                break
        out[new] = value
    return out
