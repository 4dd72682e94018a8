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


# --------------------------------------------------------------------------- FLUX stand-ins


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    def __init__(self, dim, double):
        super().__init__()
        self.count = 6 if double else 3
        self.lin = nn.Linear(dim, self.count * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.count, dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


def _heads(x, heads):
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)


def _attend(q, k, v, heads):
    out = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads))
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


class DoubleStreamBlock(nn.Module):
    """sd-scripts' FLUX double block: its class name and child names, a simplified body."""

    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.heads = heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(dim, True))
            setattr(self, f"{stream}_attn", SelfAttention(dim))
            setattr(self, f"{stream}_mlp", nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                                        nn.Linear(mlp_ratio * dim, dim)))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.gradient_checkpointing = False

    def _forward(self, img, txt, vec):
        i1s, i1c, i1g, i2s, i2c, i2g = self.img_mod(vec)
        t1s, t1c, t1g, t2s, t2c, t2g = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv((1 + i1c) * self.norm(img) + i1s).chunk(3, dim=-1)
        tq, tk, tv = self.txt_attn.qkv((1 + t1c) * self.norm(txt) + t1s).chunk(3, dim=-1)
        attn = _attend(torch.cat([tq, iq], 1), torch.cat([tk, ik], 1), torch.cat([tv, iv], 1), self.heads)
        t_attn, i_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + i1g * self.img_attn.proj(i_attn)
        img = img + i2g * self.img_mlp((1 + i2c) * self.norm(img) + i2s)
        txt = txt + t1g * self.txt_attn.proj(t_attn)
        txt = txt + t2g * self.txt_mlp((1 + t2c) * self.norm(txt) + t2s)
        return img, txt

    def forward(self, img, txt, vec):
        if self.training and self.gradient_checkpointing:  # as sd-scripts: non-reentrant
            return torch.utils.checkpoint.checkpoint(self._forward, img, txt, vec, use_reentrant=False)
        return self._forward(img, txt, vec)


class SingleStreamBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.heads, self.dim, self.mlp = heads, dim, mlp_ratio * dim
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp)  # rows: q, k, v, mlp
        self.linear2 = nn.Linear(dim + self.mlp, dim)
        self.modulation = Modulation(dim, False)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.gradient_checkpointing = False

    def _forward(self, x, vec):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift), [3 * self.dim, self.mlp], dim=-1)
        attn = _attend(*qkv.chunk(3, dim=-1), self.heads)
        return x + gate * self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], -1))

    def forward(self, x, vec):
        if self.training and self.gradient_checkpointing:
            return torch.utils.checkpoint.checkpoint(self._forward, x, vec, use_reentrant=False)
        return self._forward(x, vec)


class Flux(nn.Module):
    """sd-scripts' FLUX.1 DiT (library.flux_models.Flux) in miniature: the same module names and
    keyword-only call, timesteps = sigma in [0, 1] (embedded x1000 inside, as the real model)."""

    def __init__(self, in_channels=16, hidden=32, heads=2, context=24, vec=16, depth=2, depth_single=2):
        super().__init__()
        self.hidden = hidden
        self.img_in = nn.Linear(in_channels, hidden)
        self.time_in = MLPEmbedder(32, hidden)
        self.vector_in = MLPEmbedder(vec, hidden)
        self.guidance_in = MLPEmbedder(32, hidden)
        self.txt_in = nn.Linear(context, hidden)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden, heads) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden, heads) for _ in range(depth_single)])
        self.final_layer = nn.Linear(hidden, in_channels)

    @staticmethod
    def _embed(t, dim=32):
        t = t.float().reshape(-1) * 1000.0
        freqs = torch.exp(-torch.arange(dim // 2, dtype=torch.float32) * (9.21 / (dim // 2)))
        args = t[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], -1)

    def enable_gradient_checkpointing(self):
        for block in list(self.double_blocks) + list(self.single_blocks):
            block.gradient_checkpointing = True

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, block_controlnet_hidden_states=None,
                block_controlnet_single_hidden_states=None, guidance=None, txt_attention_mask=None, mod_vectors=None):
        vec = self.time_in(self._embed(timesteps)) + self.vector_in(y)
        if guidance is not None:
            vec = vec + self.guidance_in(self._embed(guidance))
        img, txt = self.img_in(img), self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            x = block(x, vec)
        return self.final_layer(x[:, txt.shape[1]:])


def tiny_t5(seed=0, hidden=24):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=300, d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=2, num_heads=3,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def flux_models(seed=0):
    """[CLIP-L, T5] and the FLUX stand-in, as sd-scripts' flux_train_network.py passes them."""
    torch.manual_seed(seed)
    return [tiny_clip(seed, hidden=16), tiny_t5(seed + 1)], Flux().eval()


def flux_call(model, batch=2, sigmas=None, seed=0, tokens=4, txt_tokens=3):
    """The keyword-only call sd-scripts makes (flux_train_network.py), with one sigma per sample."""
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.rand(batch, generator=g) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32)
    return dict(img=torch.randn(batch, tokens, 16, generator=g), img_ids=torch.zeros(batch, tokens, 3),
                txt=torch.randn(batch, txt_tokens, 24, generator=g), txt_ids=torch.zeros(batch, txt_tokens, 3), y=torch.randn(batch, 16, generator=g),
                timesteps=sigmas, guidance=torch.full((batch,), 3.5), txt_attention_mask=None, mod_vectors=None)
