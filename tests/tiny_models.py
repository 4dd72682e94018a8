"""Tiny random-weight models with the real module layouts, built from configs (no downloads).

- SD 1.x: diffusers UNet2DConditionModel with 1x1-conv proj_in/proj_out, one CLIP text encoder.
- SDXL (diffusers layout): linear projections, text_time conditioning, two CLIP text encoders.
- SDXL (sd-scripts' SGM layout): `SgmTinyUNet`, a stand-in with sd-scripts' module names
  (input_blocks.N.1 / middle_block.1 / output_blocks.N.1 Transformer2DModel blocks) and its
  forward signature forward(x, timesteps=None, context=None, y=None).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

CROSS_DIM = 32


def tiny_sd1_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def tiny_sdxl_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * CROSS_DIM,
        attention_head_dim=(4, 8),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=CROSS_DIM + 6 * 8,
        norm_num_groups=8,
    ).eval()


def tiny_clip(seed=0, hidden=CROSS_DIM, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        max_position_embeddings=77,
        projection_dim=hidden,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def sd1_models(seed=0):
    return [tiny_clip(seed)], tiny_sd1_unet(seed)


def sdxl_models(seed=0):
    return [tiny_clip(seed), tiny_clip(seed + 1, projection=True)], tiny_sdxl_unet(seed)


def sdxl_added_cond(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"text_embeds": torch.randn(batch, CROSS_DIM, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}


# --------------------------------------------------------------------------- SGM-layout stand-in


class _Attention(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out[0](F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0])


class _FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, 4 * dim)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(2 * dim, dim)])

    def forward(self, x):
        a, b = self.net[0].proj(x).chunk(2, dim=-1)
        return self.net[2](a * F.gelu(b))


class _BasicTransformerBlock(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = _Attention(dim, dim)
        self.attn2 = _Attention(dim, context_dim)
        self.ff = _FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Same class name and child names as sd-scripts' SDXL U-Net block (linear projections)."""

    def __init__(self, dim, context_dim, depth=1):
        super().__init__()
        self.norm = nn.GroupNorm(8, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([_BasicTransformerBlock(dim, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, dim)
        self.gradient_checkpointing = False
        self.checkpoint_reentrant = True  # sd-scripts' SDXL U-Net uses reentrant checkpointing

    def forward(self, x, context):
        b, c, h, w = x.shape
        hidden = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden = torch.utils.checkpoint.checkpoint(block, hidden, context, use_reentrant=self.checkpoint_reentrant)
            else:
                hidden = block(hidden, context)
        return x + self.proj_out(hidden).reshape(b, h, w, c).permute(0, 3, 1, 2)


class ResnetBlock2D(nn.Module):
    def __init__(self, dim, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(8, dim), nn.SiLU(), nn.Conv2d(dim, dim, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, dim))
        self.out_layers = nn.Sequential(nn.GroupNorm(8, dim), nn.SiLU(), nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return x + self.out_layers(h)


class SgmTinyUNet(nn.Module):
    """A two-level U-Net with sd-scripts' SDXL module names and call signature."""

    def __init__(self, dim=32, context_dim=2 * CROSS_DIM, adm_dim=CROSS_DIM + 6 * 8):
        super().__init__()
        self.dim = dim
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_dim, dim), nn.SiLU(), nn.Linear(dim, dim)))
        self.input_blocks = nn.ModuleList(
            [
                nn.ModuleList([nn.Conv2d(4, dim, 3, padding=1)]),
                nn.ModuleList([ResnetBlock2D(dim, dim), Transformer2DModel(dim, context_dim)]),
            ]
        )
        self.middle_block = nn.ModuleList([ResnetBlock2D(dim, dim), Transformer2DModel(dim, context_dim, depth=2), ResnetBlock2D(dim, dim)])
        self.output_blocks = nn.ModuleList([nn.ModuleList([ResnetBlock2D(dim, dim), Transformer2DModel(dim, context_dim)])])
        self.out = nn.Sequential(nn.GroupNorm(8, dim), nn.SiLU(), nn.Conv2d(dim, 4, 3, padding=1))

    def set_gradient_checkpointing(self, enabled: bool, reentrant: bool = True):
        for module in self.modules():
            if isinstance(module, Transformer2DModel):
                module.gradient_checkpointing = enabled
                module.checkpoint_reentrant = reentrant

    def _time_embedding(self, timesteps, batch):
        timesteps = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1).expand(batch)
        half = self.dim // 2
        freqs = torch.exp(-torch.arange(half, dtype=torch.float32) * (9.21 / half))
        args = timesteps[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, x, timesteps=None, context=None, y=None):
        emb = self.time_embed(self._time_embedding(timesteps, x.shape[0])) + self.label_emb(y)
        h = self.input_blocks[0][0](x)
        h = self.input_blocks[1][1](self.input_blocks[1][0](h, emb), context)
        h = self.middle_block[2](self.middle_block[1](self.middle_block[0](h, emb), context), emb)
        h = self.output_blocks[0][1](self.output_blocks[0][0](h, emb), context)
        return self.out(h)


def sgm_models(seed=0):
    torch.manual_seed(seed)
    return [tiny_clip(seed), tiny_clip(seed + 1, projection=True)], SgmTinyUNet().eval()
