"""The reference M2ORT model (Wang et al., AAAI 2024), in plain PyTorch.

This module is the ground truth that every fast path (Triton kernels, ONNX, AOTInductor,
TensorRT) is checked against. It follows ``docs/model.md``:

* LDPE: each of the three levels of a spot, (B, 3, 224, 224), (B, 3, 112, 112) and
  (B, 3, 56, 56), is cut into the same 14 x 14 grid (patches of 16, 8 and 4 px) and embedded
  to d = D / 3 channels: LayerNorm -> Linear -> GELU -> Linear -> LayerNorm.
* The levels are concatenated on channels (B, 196, D), a class token is prepended and a learned
  positional embedding added (B, 197, D).
* ``depth`` encoder blocks, each ITMM (LayerNorm; queries from level 1's channels, keys from level
  2's, values from level 3's; attention; output projection; residual) then ICMM (LayerNorm, MLP,
  residual).
* Final LayerNorm; the class token goes through a linear regression head to ``n_genes`` values.

Patches are flattened in (p1 p2 c) order, as the ViT-style public code does with einops.
"""

from __future__ import annotations

import dataclasses
import typing

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64
IMAGE_SIZES_PX = (224, 112, 56)  # level 1 (finest), level 2, level 3
PATCH_SIZES_PX = (16, 8, 4)
GRID = 14  # tokens per side, the same for every level
NUM_TOKENS = GRID * GRID  # 196 patch tokens (+1 class token)


@dataclasses.dataclass(frozen=True)
class M2ORTConfig:
    """Architecture of one M2ORT variant."""

    dim: int  # D, divisible by 3
    depth: int
    heads: int  # each of HEAD_DIM channels
    mlp_dim: int
    n_genes: int = 250
    variant: str = "custom"
    dropout: float = 0.1  # in ITMM and ICMM, training only (the paper's code); no parameters

    def __post_init__(self) -> None:
        if self.dim % 3:
            raise ValueError(f"model width {self.dim} is not divisible by 3")

    @property
    def level_dim(self) -> int:
        """d: the channels each level contributes."""
        return self.dim // 3

    @property
    def inner_dim(self) -> int:
        return self.heads * HEAD_DIM

    def with_genes(self, n_genes: int) -> M2ORTConfig:
        return dataclasses.replace(self, n_genes=n_genes)


# The paper's variants (the variant table of docs/model.md), and "tiny": a small configuration of the same
# architecture that is not in the paper, used for the shipped demo model and fast tests.
VARIANTS: dict[str, M2ORTConfig] = {
    "tiny": M2ORTConfig(dim=192, depth=2, heads=3, mlp_dim=256, variant="tiny"),
    "small": M2ORTConfig(dim=576, depth=6, heads=9, mlp_dim=384, variant="small"),
    "base": M2ORTConfig(dim=768, depth=8, heads=12, mlp_dim=512, variant="base"),
    "large": M2ORTConfig(dim=1152, depth=12, heads=18, mlp_dim=768, variant="large"),
}
PAPER_VARIANTS = ("small", "base", "large")


def get_config(variant: str, n_genes: int = 250) -> M2ORTConfig:
    try:
        return VARIANTS[variant].with_genes(n_genes)
    except KeyError:
        raise ValueError(f"unknown M2ORT variant {variant!r}; known: {', '.join(VARIANTS)}") from None


class LevelPatchEmbed(nn.Module):
    """LDPE branch of one level: (B, 3, H, W) -> (B, 196, d)."""

    def __init__(self, patch_px: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.patch_px = patch_px
        patch_values = patch_px * patch_px * 3
        self.norm_in = nn.LayerNorm(patch_values)
        self.fc1 = nn.Linear(patch_values, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W), or its tokens (B, 196, p*p*3) as :func:`patchify` lays them out; any
        float dtype (cast to the branch's here) -> (B, 196, d)."""
        dtype = self.fc1.weight.dtype
        x = image.to(dtype) if image.dim() == 3 else patchify(image, self.patch_px, dtype=dtype)
        x = self.fc2(F.gelu(self.fc1(self.norm_in(x))))
        return self.norm_out(x)


def patchify(image: torch.Tensor, patch_px: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C) in ``dtype`` (default: the image's), patches
    flattened in (p1 p2 c) order.

    Two copies with long contiguous runs: to channels-last (B, H, W, C), cast on the way (nothing
    to do for a channels-last image of that dtype), then each patch's rows side by side (runs of
    p*C values). Straight from NCHW one copy would gather 1-value runs strided by H*W: 2-3x slower on
    the CPU than both (level 1 was 16% of `tiny`'s bf16 time)."""
    b, c, h, w = image.shape
    gh, gw = h // patch_px, w // patch_px
    x = image.to(dtype=dtype or image.dtype, memory_format=torch.channels_last).permute(0, 2, 3, 1)  # b h w c
    x = x.reshape(b, gh, patch_px, gw, patch_px, c).transpose(2, 3)  # b gh gw p1 p2 c
    return x.reshape(b, gh * gw, patch_px * patch_px * c)


class ITMM(nn.Module):
    """Intra-level token mixing: (B, T, D) -> (B, T, D).

    LayerNorm over D, then attention whose queries come from level 1's d channels, keys from
    level 2's and values from level 3's; output projection with bias; residual add.

    The attention is written out (scores, softmax, weighted sum) unless ``fused``: then it is one
    ``scaled_dot_product_attention`` call, the same math without the (B, heads, T, T) scores in
    memory (training and the exported graph use it; the default stays the literal form).
    """

    def __init__(self, cfg: M2ORTConfig):
        super().__init__()
        d, inner = cfg.level_dim, cfg.inner_dim
        self.heads = cfg.heads
        self.norm = nn.LayerNorm(cfg.dim)
        self.to_q = nn.Linear(d, inner, bias=False)
        self.to_k = nn.Linear(d, inner, bias=False)
        self.to_v = nn.Linear(d, inner, bias=False)
        self.proj = nn.Linear(inner, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.scale = HEAD_DIM**-0.5
        self.fused_attention = False

    def forward(self, x: torch.Tensor, query_tokens: int | None = None, fused: bool | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, Q, D). Q = ``query_tokens`` or T: only the first Q tokens get queries
        (and the residual), keys and values come from all T. ``fused`` None: ``self.fused_attention``."""
        b, t, dim = x.shape
        d = dim // 3
        q_rows = t if query_tokens is None else query_tokens
        h = self.norm(x)
        q = self.to_q(h[:, :q_rows, :d]).reshape(b, q_rows, self.heads, HEAD_DIM).transpose(1, 2)
        k = self.to_k(h[..., d : 2 * d]).reshape(b, t, self.heads, HEAD_DIM).transpose(1, 2)
        v = self.to_v(h[..., 2 * d :]).reshape(b, t, self.heads, HEAD_DIM).transpose(1, 2)
        if self.fused_attention if fused is None else fused:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
            out = attn @ v
        out = out.transpose(1, 2).reshape(b, q_rows, self.heads * HEAD_DIM)
        return x[:, :q_rows] + self.drop(self.proj(out))


class ICMM(nn.Module):
    """Inter-level channel mixing: (B, T, D) -> (B, T, D): x + MLP(LayerNorm(x))."""

    def __init__(self, cfg: M2ORTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.norm(x))))))


class Block(nn.Module):
    def __init__(self, cfg: M2ORTConfig):
        super().__init__()
        self.itmm = ITMM(cfg)
        self.icmm = ICMM(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.icmm(self.itmm(x))


class M2ORT(nn.Module):
    """Many-to-one regression transformer.

    forward(level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56))
    -> (B, n_genes). Inputs are RGB in [0, 1] (after the checkpoint's normalisation). With LDPE
    each level may come as its tokens instead, (B, 196, p*p*3) in :func:`patchify`'s layout
    (the streamed host path assembles them so: ``TorchBackend.input_token_px``); the same values
    give the same bits either way.
    """

    def __init__(self, cfg: M2ORTConfig, token_embed: nn.Module | None = None):
        """``token_embed``: another source of the (B, N, D) tokens in place of LDPE, called with the
        three levels and carrying ``num_tokens`` (N): a pretrained image encoder's feature maps
        (:class:`m2ort_fast.encoders.EncoderTokens`). None: the paper's LDPE (state-dict keys unchanged)."""
        super().__init__()
        self.cfg = cfg
        d = cfg.level_dim
        hidden = (cfg.dim, cfg.dim // 2, cfg.dim // 4)
        self.token_embed = token_embed
        n_tokens = NUM_TOKENS if token_embed is None else typing.cast(int, token_embed.num_tokens)
        self.embeds = nn.ModuleList(
            LevelPatchEmbed(p, hid, d) for p, hid in zip(PATCH_SIZES_PX, hidden, strict=True) if token_embed is None
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens + 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.n_genes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        own = set(self.token_embed.modules()) if self.token_embed is not None else set()  # initialised by itself
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in own:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def encoder_blocks(self) -> list[Block]:
        """The ``depth`` encoder blocks, typed (iterating the nn.ModuleList gives plain Modules)."""
        return typing.cast(list[Block], list(self.blocks))

    def embed(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        """LDPE (or ``token_embed``) + fusion: three levels -> tokens (B, 197, D) ((B, N + 1, D))."""
        if self.token_embed is not None:
            return self.fuse(self.token_embed(level1, level2, level3))
        levels = (level1, level2, level3)
        # a plain zip: torch.export traces this line (three embeds, three levels)
        tokens = torch.cat([emb(img) for emb, img in zip(self.embeds, levels)], dim=-1)  # noqa: B905
        return self.fuse(tokens)

    def fuse(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) level tokens -> (B, N + 1, D): class token prepended, positional embedding added."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encoder blocks + final norm: (B, 197, D) -> class token (B, D).

        Every block runs for every token, the last one too: running it for the class token alone
        (what the head reads) saves 1/depth of the work but makes a spot's prediction depend, by an
        ulp, on its position in the batch (the GEMMs' row blocking at so few rows), and the engines
        and precisions are held to giving a spot the same prediction whatever its batch-mates."""
        for block in self.encoder_blocks():
            tokens = block(tokens)
        return self.norm(tokens[:, 0])

    def forward(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(self.embed(level1, level2, level3)))


def set_fused_attention(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every ITMM of ``model`` to the fused attention op (or back); returns ``model``."""
    for module in model.modules():
        if isinstance(module, ITMM):
            module.fused_attention = enabled
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_spot(cfg: M2ORTConfig) -> int:
    """FLOPs of one spot: 2 per multiply-add over the linear layers and both attention matmuls
    (the spec's convention; softmax, norms and GELU not counted)."""
    d, D, inner, t = cfg.level_dim, cfg.dim, cfg.inner_dim, NUM_TOKENS + 1
    macs = 0
    for p, hidden in zip(PATCH_SIZES_PX, (D, D // 2, D // 4), strict=True):
        macs += NUM_TOKENS * (3 * p * p * hidden + hidden * d)
    per_block = t * (3 * d * inner + inner * D + 2 * D * cfg.mlp_dim) + 2 * t * t * inner
    macs += cfg.depth * per_block + D * cfg.n_genes
    return 2 * macs


def build_model(variant: str = "small", n_genes: int = 250, seed: int | None = None) -> M2ORT:
    if seed is not None:
        torch.manual_seed(seed)
    return M2ORT(get_config(variant, n_genes)).eval()


def describe(cfg: M2ORTConfig) -> dict:
    """Size summary of a configuration, as `m2ort-fast info --model` prints it."""
    with torch.device("meta"):
        params = count_parameters(M2ORT(cfg))
    flops = flops_per_spot(cfg)
    return {
        "variant": cfg.variant,
        "dim": cfg.dim,
        "depth": cfg.depth,
        "heads": cfg.heads,
        "mlp_dim": cfg.mlp_dim,
        "n_genes": cfg.n_genes,
        "params": params,
        "params_M": round(params / 1e6, 2),
        "gflops_per_spot": round(flops / 1e9, 2),
        "in_paper": cfg.variant in PAPER_VARIANTS,
    }
