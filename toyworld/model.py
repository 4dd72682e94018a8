"""The toy text-to-image model: configs of the real SD 1.x classes, sized for a 2-core CPU.

Image 64x64 RGB -> AutoencoderKL (3 blocks, 4x downsampling) -> latents 4x16x16 ->
UNet2DConditionModel (cross-attention on a small CLIPTextModel's last hidden state, 77 tokens)
with an SD-like noise schedule (1000 steps, scaled_linear 0.00085..0.012, epsilon prediction).
"""

from typing import Dict, Optional

# The defaults are what the shipped model was trained with (see models/toyworld-sd/train_log.txt).
DEFAULTS: Dict[str, object] = {
    "image_size": 64,
    "vae_channels": (16, 32, 64),
    "vae_groups": 4,  # few groups: a flat image must keep its colour through GroupNorm (see build_vae)
    "latent_channels": 4,
    "unet_channels": (32, 64, 96),
    "unet_layers": 1,
    "unet_heads": 4,
    "unet_attention": (False, True, True),  # per level (16x16, 8x8, 4x4): transformer blocks or not
    "unet_groups": 8,
    "te_hidden": 128,
    "te_layers": 3,
    "te_heads": 4,
    "max_tokens": 77,
}

# SD's own schedule is scaled_linear 0.00085..0.012; at t = 999 it keeps sqrt(alpha_bar) = 0.068
# of the signal. With flat backgrounds the image's mean colour then shows through the noise at
# every training timestep, the model learns to read it from there instead of from the caption, and
# from pure noise at sampling time it invents off-palette backgrounds (SD's "can't make a black
# image" problem, magnified). DDPM's linear 0.0001..0.02 keeps 0.0064 at t = 999 (0.0096 at
# DDIM's first step t = 961), so the background has to come from the text. Everything else is
# as in SD: 1000 steps, epsilon prediction, DDIM/DDPM compatible.
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def build_vae(cfg: Dict[str, object], scaling_factor: float = 1.0):
    """GroupNorm normalises each group of channels over the whole image; with one or two channels
    per group, a flat background normalises to zero and its colour survives only through padding
    effects at the borders (a colour cast and edge artefacts). Hence few groups (4)."""
    from diffusers import AutoencoderKL

    n = len(cfg["vae_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg["vae_channels"]),
        layers_per_block=1,
        latent_channels=int(cfg["latent_channels"]),
        norm_num_groups=int(cfg["vae_groups"]),
        sample_size=int(cfg["image_size"]),
        scaling_factor=float(scaling_factor),
    )


def latent_size(cfg: Dict[str, object]) -> int:
    return int(cfg["image_size"]) // 2 ** (len(cfg["vae_channels"]) - 1)


def build_unet(cfg: Dict[str, object]):
    from diffusers import UNet2DConditionModel

    ch = tuple(cfg["unet_channels"])
    attn = tuple(bool(a) for a in cfg["unet_attention"])
    assert len(attn) == len(ch), "one unet_attention flag per level"
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    return UNet2DConditionModel(
        sample_size=latent_size(cfg),
        in_channels=int(cfg["latent_channels"]),
        out_channels=int(cfg["latent_channels"]),
        layers_per_block=int(cfg["unet_layers"]),
        block_out_channels=ch,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        cross_attention_dim=int(cfg["te_hidden"]),
        attention_head_dim=int(cfg["unet_heads"]),  # diffusers' SD1 naming: this is the number of heads
        norm_num_groups=int(cfg["unet_groups"]),
    )


def build_tokenizer(folder: Optional[str] = None):
    """The word-level CLIP tokenizer of the world's vocabulary (plus "sks"). With `folder`, also
    saves it there (tokenizer_config.json, vocab.json, merges.txt, ...)."""
    from tlora_trainer.tokenizers import clip_tokenizer

    from .world import vocabulary

    tok = clip_tokenizer(vocabulary(), model_max_length=77)
    if folder:
        tok.save_pretrained(folder)
    return tok


def build_text_encoder(cfg: Dict[str, object], tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    hidden = int(cfg["te_hidden"])
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=int(cfg["te_layers"]),
        num_attention_heads=int(cfg["te_heads"]),
        max_position_embeddings=int(cfg["max_tokens"]),
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_scheduler(kind: str = "ddim"):
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddpm":
        return DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")})
    return DDIMScheduler(**SCHEDULER)
