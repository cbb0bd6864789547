"""SiT with REG: a diffusion transformer that denoises VAE latent patches and one entangled class
token.

Parameter names, shapes, initialisation and outputs mirror the official REG `models/sit.py` (itself
REPA's SiT, built on DiT), so official checkpoints load with `strict=True`. One class covers the
three methods as settings: REG (`use_cls_token=True`, the default), REPA (`use_cls_token=False`) and
plain SiT (`z_dims=()`: no projectors).
"""
import dataclasses
import functools
import math
import numbers

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from regdit import RegditError


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding layers for timesteps, class labels and patches        #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t in [0, 1] (not scaled by 1000, unlike DiT), then a 2-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period)
                          * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim); dim is even here

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with a null class (index `num_classes`) for classifier-free guidance
    dropout."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train, force_drop_ids=None):
        """force_drop_ids (N,) bool: the caller decides which labels to drop (DiT), e.g. from its
        own generator."""
        if force_drop_ids is None and train and self.dropout_prob > 0:
            force_drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids, self.num_classes, labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with T = (H / p) * (W / p); the official code uses timm's
    PatchEmbed."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size,
                              bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


#################################################################################
#                                 Core SiT block                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (`qkv`, optional `q_norm`/`k_norm`,
    `proj`).

    `fused_attn=True` uses `F.scaled_dot_product_attention` (flash / memory-efficient kernels on
    GPU); False is the explicit softmax(q k^T / sqrt(d)) v of the reference implementation, kept for
    parity checks.
    """

    def __init__(self, dim, num_heads, qk_norm=False, fused_attn=True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        # timm's default norm layer
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        # 3x (N, h, T, d)
        q, k, v = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT): shift, scale and gate for attention and
    MLP from c."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, fused_attn=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(),
                                              nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=-1))
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated output layer: `linear` maps patch tokens to patches, `linear_cls` the
    entangled tokens to their velocities."""

    def __init__(self, hidden_size, patch_size, out_channels, cls_dim=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if cls_dim is not None:
            self.linear_cls = nn.Linear(hidden_size, cls_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(),
                                              nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c, num_entangled):
        """Patch outputs of the tokens after the first `num_entangled`, and those tokens' outputs
        (N, K, cls_dim), or None without entangled tokens."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        if not num_entangled:
            return self.linear(x), None
        return self.linear(x[:, num_entangled:]), self.linear_cls(x[:, :num_entangled])


def matmul_flops(module, rows):
    """FLOPs (2 per multiply-add) of every Linear and Conv2d weight in `module` applied to `rows`
    tokens (a conv to `rows` patches), the count torch.utils.flop_counter gives for these layers."""
    return 2 * rows * sum(m.weight.numel() for m in module.modules()
                          if isinstance(m, (nn.Linear, nn.Conv2d)))


def attention_flops(tokens, width):
    """FLOPs of softmax(q k^T) v over all heads: scores and weighted values, 2 T^2 D each."""
    return 4 * tokens ** 2 * width


def build_mlp(hidden_size, projector_dim, z_dim):
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))


#################################################################################
#                                  SiT + REG                                    #
#################################################################################

@dataclasses.dataclass(frozen=True)
class SiTConfig:
    """The architecture of a SiT: all that rebuilds it. Every checkpoint and export stores it as a
    dict (`to_dict`).

    REG is `use_cls_token=True`; REPA is `use_cls_token=False`; plain SiT is also `z_dims=()` (no
    projectors).
    """
    input_size: int = 32  # latent side: image side / VAE downsampling
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    # > 0 adds the null class (index num_classes) for classifier-free guidance
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    # widths of the aligned encoders; z_dims[0] is the entangled class token's width
    z_dims: tuple = (768,)
    projector_dim: int = 2048
    # the block (1-based) whose tokens the projectors align with the encoders
    encoder_depth: int = 8
    # further blocks aligned with the encoders, each through projectors of its own (REPA at several
    # depths); empty: encoder_depth alone, as the paper
    align_depths: tuple = ()
    qk_norm: bool = False
    use_cls_token: bool = True
    # entangled tokens: the first encoder's class token (REG), then its register tokens
    entangled_tokens: int = 1

    def __post_init__(self):
        """Types and ranges first (a config may come from any file, e.g. an export's config.json):
        integers are integers of at least 1 (not bools, floats or strings), numbers finite, switches
        true or false."""
        def whole(value):
            return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                    and value >= 1)

        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type is int and not whole(value):
                raise RegditError(f"{field.name} must be an integer of at least 1, "
                                  f"not {value!r:.40}")
            if field.type is bool and not isinstance(value, bool):
                raise RegditError(f"{field.name} must be true or false, not {value!r:.40}")
            if field.type is float and not (isinstance(value, numbers.Real)
                                            and not isinstance(value, bool)
                                            and math.isfinite(value)):
                raise RegditError(f"{field.name} must be a finite number, not {value!r:.40}")
            if field.type in (int, float):
                object.__setattr__(self, field.name, field.type(value))
        for name in ("z_dims", "align_depths"):
            value = getattr(self, name)
            if not (isinstance(value, (list, tuple)) and all(map(whole, value))):
                raise RegditError(f"{name} must be a list of integers of at least 1, not "
                                  f"{value!r:.60}")
            object.__setattr__(self, name, tuple(int(d) for d in value))
        if self.mlp_ratio <= 0:
            raise RegditError(f"mlp_ratio {self.mlp_ratio} must be above 0")
        if not 0 <= self.class_dropout_prob <= 1:
            raise RegditError(f"class_dropout_prob {self.class_dropout_prob} must be between 0 "
                              "and 1")
        if self.use_cls_token and not self.z_dims:
            raise RegditError("the REG class token needs an encoder: give z_dims (the encoder "
                              "widths) or use_cls_token=False")
        if self.hidden_size % self.num_heads:
            raise RegditError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                              f"{self.num_heads}: pick a width that is a multiple of the heads "
                              "(--hidden-size, --num-heads)")
        # get_2d_sincos_pos_embed: sin and cos of the row and of the column, a quarter each
        if self.hidden_size % 4:
            raise RegditError(f"hidden_size {self.hidden_size} is not a multiple of 4, as the "
                              "sin-cos position embedding needs: pick a multiple of 4 "
                              "(--hidden-size)")
        if self.input_size % self.patch_size:
            raise RegditError(f"the {self.input_size}x{self.input_size} latent does not tile into "
                              f"{self.patch_size}x{self.patch_size} patches: use a resolution "
                              f"whose latent side is a multiple of {self.patch_size}, or a model "
                              "with a smaller patch")
        depths = [("encoder_depth", self.encoder_depth)] + [("align_depths", depth)
                                                            for depth in self.align_depths]
        for name, depth in depths if self.z_dims else ():
            if not 1 <= depth <= self.depth:
                raise RegditError(f"{name} {depth} must be between 1 and the model depth "
                                  f"{self.depth}")
        if len({self.encoder_depth, *self.align_depths}) <= len(self.align_depths):
            raise RegditError(f"align_depths {list(self.align_depths)} repeat a depth (or "
                              f"encoder_depth {self.encoder_depth})")
        if self.entangled_tokens > 1 and not self.use_cls_token:
            raise RegditError(f"entangled_tokens {self.entangled_tokens} needs the REG class "
                              "token (--method reg)")

    @classmethod
    def from_dict(cls, values, source="model config"):
        """The stored dict back as a config; an unknown name is a one-line error."""
        if not isinstance(values, dict):
            raise RegditError(f"{source}: the model settings are a {type(values).__name__}, not a "
                              "dict of SiTConfig fields")
        unknown = sorted(map(str, set(values) - {f.name for f in dataclasses.fields(cls)}))
        if unknown:
            raise RegditError(f"{source}: unknown model settings {', '.join(unknown)}; it was "
                              "written by another program or a newer regdit")
        try:
            return cls(**values)
        except RegditError as error:
            raise RegditError(f"{source}: {error}") from None

    def to_dict(self):
        return {**dataclasses.asdict(self), "z_dims": list(self.z_dims),
                "align_depths": list(self.align_depths)}

    @property
    def label(self):
        """`SiT-XL/2` for a standard size, else `SiT-custom/2`: the model's part of sample folder
        names (`display_name` is the name people read)."""
        return f"SiT-{standard_size(self.depth, self.hidden_size) or 'custom'}/{self.patch_size}"

    @property
    def display_name(self):
        return model_label(self.depth, self.hidden_size, self.patch_size)


def standard_size(depth, width):
    """`XL` for SiT-XL's depth and width (MODEL_SIZES), None for other sizes."""
    return next((size for size, (d, w, _) in MODEL_SIZES.items() if (d, w) == (depth, width)), None)


def model_label(depth, width, patch_size):
    """The one name of a model on every page: `SiT-XL/2` for a standard size, else its depth and
    width spelt out (`SiT/1, depth 3, width 128`)."""
    size = standard_size(depth, width)
    return f"SiT-{size}/{patch_size}" if size else f"SiT/{patch_size}, depth {depth}, width {width}"


class SiT(nn.Module):
    """SiT diffusion transformer with REPA projectors and the REG entangled class token.

    forward(x, t, y, cls_token) -> (velocity (N, C, H, W), zs [(N, T+1, z_dim_k)], cls_velocity
    shaped as cls_token). The entangled tokens are `cls_shape` per sample: (z_dims[0],) for REG's
    one class token, (K, z_dims[0]) for K > 1. zs holds the projected tokens of block encoder_depth
    for each encoder, then those of each of align_depths. REPA (`use_cls_token=False`) returns
    cls_velocity None and zs of T tokens; plain SiT (`z_dims=()`) returns zs []. `fused_attn` and
    `grad_checkpointing` choose how it runs, not what it computes, so they are not in the config.
    """

    def __init__(self, config: SiTConfig, fused_attn=True, grad_checkpointing=False):
        super().__init__()
        self.config = config
        self.input_size, self.patch_size = config.input_size, config.patch_size
        self.in_channels, self.out_channels = config.in_channels, config.in_channels
        self.num_heads, self.num_classes = config.num_heads, config.num_classes
        self.z_dims = list(config.z_dims)
        self.encoder_depth = config.encoder_depth if self.z_dims else 0
        self.use_cls_token = config.use_cls_token
        self.num_entangled = config.entangled_tokens if config.use_cls_token else 0
        self.align_depths = (self.encoder_depth, *config.align_depths) if self.z_dims else ()
        # recompute block activations in backward: less memory
        self.grad_checkpointing = grad_checkpointing
        hidden_size = config.hidden_size

        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels,
                                     hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, hidden_size, config.class_dropout_prob)
        num_tokens = self.x_embedder.num_patches + self.num_entangled
        # fixed sin-cos
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, config.num_heads, config.mlp_ratio,
                                              qk_norm=config.qk_norm, fused_attn=fused_attn)
                                     for _ in range(config.depth)])
        self.projectors = nn.ModuleList([build_mlp(hidden_size, config.projector_dim, z_dim)
                                         for z_dim in self.z_dims])
        if config.align_depths:  # the official names stay those of encoder_depth's projectors
            self.depth_projectors = nn.ModuleList([nn.ModuleList([
                build_mlp(hidden_size, config.projector_dim, z_dim) for z_dim in self.z_dims])
                for _ in config.align_depths])
        self.final_layer = FinalLayer(hidden_size, config.patch_size, self.out_channels,
                                      cls_dim=self.z_dims[0] if self.use_cls_token else None)
        if self.use_cls_token:
            # the entangled class token enters through a linear map and a LayerNorm (token 0)
            self.cls_projectors2 = nn.Linear(self.z_dims[0], hidden_size, bias=True)
            self.wg_norm = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.initialize_weights()

    def initialize_weights(self):
        # A meta-device SiT holds shapes only (checkpoint.build_model_from_checkpoint compares them
        # with a file's weights): nothing to fill, and the sin-cos table would take the memory that
        # the file's settings claim.
        if self.pos_embed.is_meta:
            return

        def _basic_init(module):  # xavier-uniform Linear layers, zero biases (DiT)
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)

        grid_size = int(self.x_embedder.num_patches ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size,
                                            extra_tokens=self.num_entangled)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data  # initialise the patch embedding like a Linear layer
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        zero_layers = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.use_cls_token:
            zero_layers.append(self.final_layer.linear_cls)
        for layer in zero_layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def flops(self):
        """Analytic forward FLOPs of one image (matmuls, 2 per multiply-add); a training step costs
        3x this."""
        tokens, width = self.pos_embed.shape[1:]
        patches = self.x_embedder.num_patches
        per_sample = ([self.t_embedder, self.final_layer.adaLN_modulation]
                      + [b.adaLN_modulation for b in self.blocks])
        entangled = ([self.cls_projectors2, self.final_layer.linear_cls] if self.use_cls_token
                     else [])
        return (sum(matmul_flops(m, 1) for m in per_sample)
                + sum(matmul_flops(m, self.num_entangled) for m in entangled)
                + matmul_flops(self.x_embedder, patches)
                + matmul_flops(self.final_layer.linear, patches)
                + len(self.align_depths) * matmul_flops(self.projectors, tokens)
                + sum(matmul_flops(b.attn, tokens) + matmul_flops(b.mlp, tokens)
                      + attention_flops(tokens, width) for b in self.blocks))

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, cls_token=None, force_drop_ids=None):
        """x (N, C, H, W) noisy latents, t (N,) in [0, 1], y (N,) labels (num_classes = null),
        cls_token (N, *cls_shape) the noisy entangled tokens; force_drop_ids (N,) bool replaces the
        random label dropout of training mode (deterministic training)."""
        x = self.x_embedder(x)  # (N, T, D)
        if self.use_cls_token:
            if cls_token is None or cls_token.shape[1:] != self.cls_shape:
                raise ValueError(f"this REG model denoises entangled tokens: pass cls_token (N, "
                                 f"{', '.join(map(str, self.cls_shape))})")
            tokens = cls_token.view(len(cls_token), self.num_entangled, -1)
            cls_embed = self.wg_norm(self.cls_projectors2(tokens))  # (N, K, D)
            x = torch.cat([cls_embed, x], dim=1)  # (N, K + T, D)
        x = x + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        zs = [None] * len(self.align_depths)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
            if i + 1 in self.align_depths:
                # REPA: align this layer's tokens with the encoder's features
                aligned = self.align_depths.index(i + 1)
                zs[aligned] = self.project(x, aligned)
        x, cls_velocity = self.final_layer(x, c, self.num_entangled)
        if cls_velocity is not None:
            cls_velocity = cls_velocity.reshape(cls_token.shape[0], *self.cls_shape)
        return self.unpatchify(x), [z for depth in zs for z in depth], cls_velocity

    @property
    def cls_shape(self):
        """The entangled tokens of one sample: (z_dims[0],) for REG's class token, (K, z_dims[0])
        for K > 1."""
        width = (self.z_dims[0],)
        return width if self.num_entangled == 1 else (self.num_entangled, *width)

    def project(self, x, depth_index):
        """The projections (N, T', z_dim_k) of block tokens x for each encoder: the first entangled
        token (the class token) and the patch tokens, the extra entangled tokens left out as the
        encoder's registers are."""
        if self.num_entangled > 1:
            x = torch.cat([x[:, :1], x[:, self.num_entangled:]], dim=1)
        N, T, D = x.shape
        projectors = self.depth_projectors[depth_index - 1] if depth_index else self.projectors
        return [projector(x.reshape(-1, D)).reshape(N, T, -1) for projector in projectors]


#################################################################################
#                  Sine/cosine positional embedding (MAE)                       #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size, extra_tokens=0):
    """(extra_tokens + grid_size**2, embed_dim); extra (class) token rows are zero."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    # w goes first
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    pos_embed = np.concatenate([emb_h, emb_w], axis=1)
    return np.concatenate([np.zeros([extra_tokens, embed_dim]), pos_embed], axis=0)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                  SiT configs                                  #
#################################################################################

# depth, width, heads
MODEL_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# Arguments of the official SiT that have no effect here: the path lives in the loss and the
# samplers, the final layer's width is always hidden_size, guidance is the samplers' and the
# class-token width is z_dims[0].
OFFICIAL_ONLY_ARGUMENTS = ("path_type", "decoder_hidden_size", "use_cfg", "cls_token_dim")


def create_sit(fused_attn=True, grad_checkpointing=False, **arguments):
    """`SiT(SiTConfig(**arguments))` for the official keyword call: OFFICIAL_ONLY_ARGUMENTS are
    dropped, any other unknown keyword is an error."""
    config = SiTConfig(**{k: v for k, v in arguments.items() if k not in OFFICIAL_ONLY_ARGUMENTS})
    return SiT(config, fused_attn=fused_attn, grad_checkpointing=grad_checkpointing)


# keyword arguments override the size (small experiments: e.g. SiT_models["SiT-B/2"](depth=2,
# hidden_size=64)). The official patches are 2, 4 and 8; patch 1 (a token per latent cell) suits
# small latents such as the demo's 8x8.
SiT_models = {f"SiT-{size}/{p}": functools.partial(create_sit, depth=depth, hidden_size=hidden_size,
                                                    num_heads=num_heads, patch_size=p)
              for size, (depth, hidden_size, num_heads) in MODEL_SIZES.items()
              for p in (1, 2, 4, 8)}


def model_arguments(name):
    """The SiTConfig fields a model name fixes (its size and patch), with a one-line error listing
    the valid names."""
    if name not in SiT_models:
        raise RegditError(f"unknown model {name!r}: use one of {', '.join(SiT_models)}")
    return dict(SiT_models[name].keywords)


def create_model(name, **kwargs):
    """`SiT_models[name](**kwargs)`, checking the name."""
    model_arguments(name)
    return SiT_models[name](**kwargs)
