"""Random-weight models of the real SD 1.5 and SDXL architectures, built from configs written out
here (no downloads, no weights), for the benchmarks.

- SD 1.5: diffusers UNet2DConditionModel with the runwayml/stable-diffusion-v1-5 U-Net config
  (860M parameters, 1x1-conv proj_in/proj_out) and CLIP ViT-L/14 text model (768 wide, 12 layers).
- SDXL: the stabilityai/stable-diffusion-xl-base-1.0 U-Net config (2.6B parameters, linear
  projections, 10-deep transformer blocks at the lowest level) and its two text encoders
  (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14: 1280 wide, 32 layers, with projection).
"""

import torch

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)

CLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)


def _no_grad_frozen(model):
    model.requires_grad_(False)
    return model.eval()


def unet(family: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = SD15_UNET if family == "sd15" else SDXL_UNET
    return _no_grad_frozen(UNet2DConditionModel(**config))


def clip(config: dict, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(**config)
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    return _no_grad_frozen(model)


def text_encoders(family: str):
    if family == "sd15":
        return [clip(CLIP_L)]
    return [clip(CLIP_L), clip(CLIP_BIGG, projection=True, seed=1)]


def models(family: str):
    """([text encoders], unet) with random weights, frozen, in eval mode, fp32 on CPU."""
    return text_encoders(family), unet(family)


def unet_inputs(family: str, batch: int, latent: int, seed: int = 0):
    """(args, kwargs) of one U-Net training call: noisy latents, per-sample timesteps 0..999,
    77-token text conditioning (and SDXL's pooled text + size conditioning)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, latent, latent, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    context_dim = 768 if family == "sd15" else 2048
    context = torch.randn(batch, 77, context_dim, generator=g)
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    return (latents, timesteps, context), kwargs


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())
