"""Pre-norm transformer blocks: RMSNorm, attention through scaled_dot_product_attention with 2D
RoPE, optional cross-attention, and a SwiGLU or GELU MLP; causal self-attention with a
preallocated key/value cache for autoregressive decoding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pips.nn.rope import apply_rope_2d

Rope = tuple[torch.Tensor, torch.Tensor]


class KVCache:
    """One attention layer's keys and values, preallocated ``[B, H, capacity, head_dim]``, with a
    write cursor: :meth:`append` writes the new positions at the cursor and returns every key and
    value written so far (views, no copy), so decoding one token costs one row per layer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values  # [B, H, capacity, hd]
        self.length = 0  # the write cursor: positions filled so far

    @classmethod
    def empty(cls, batch: int, heads: int, capacity: int, head_dim: int, like: torch.Tensor):
        shape = (batch, heads, capacity, head_dim)
        return cls(like.new_zeros(shape), like.new_zeros(shape))

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor):
        """keys, values [B, H, L, hd] at positions cursor..cursor+L-1 -> all so far [B, H, n, hd]."""
        start, end = self.length, self.length + keys.shape[2]
        if end > self.capacity:
            raise ValueError(
                f"the key/value cache holds {self.capacity} positions; writing {keys.shape[2]} "
                f"more at position {start} would overflow it: allocate a longer cache"
            )
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class Attention(nn.Module):
    """Multi-head attention; queries from ``x``, keys/values from ``context`` (default ``x``).

    RoPE is applied to the queries with ``query_rope`` and to the keys with ``key_rope`` when
    given; ``key_padding_mask`` [B, Lk] is True at keys to ignore. ``causal`` lets query ``i``
    see keys up to its own position only; with a ``cache`` (self-attention) the new keys and
    values are appended to it and the queries, at the cache's positions, attend to all of it.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"model width {width} must be divisible by the heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(width, width, bias=False)
        self.key_value = nn.Linear(width, 2 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.out.is_residual_projection = True

    def forward(
        self,
        x: torch.Tensor,  # [B, Lq, D]
        context: torch.Tensor | None = None,  # [B, Lk, D]
        query_rope: Rope | None = None,
        key_rope: Rope | None = None,
        key_padding_mask: torch.Tensor | None = None,  # [B, Lk] or [B, Lq, Lk] bool, True = ignore
        causal: bool = False,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        context = x if context is None else context
        batch, query_length, width = x.shape
        head_dim = width // self.heads
        q = self.query(x).view(batch, query_length, self.heads, head_dim).transpose(1, 2)
        k, v = self.key_value(context).view(batch, -1, 2, self.heads, head_dim).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, Lk, hd]
        if query_rope is not None:
            q = apply_rope_2d(q, query_rope)
        if key_rope is not None:
            k = apply_rope_2d(k, key_rope)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.append(k, v)  # [B, H, start + Lq, hd]
        mask = None
        if causal and key_padding_mask is not None:
            raise ValueError("causal attention takes no key padding mask (pad at the end instead)")
        if causal and start > 0 and query_length > 1:  # a chunk after a prefix: explicit mask
            query_positions = torch.arange(start, start + query_length, device=x.device)
            mask = query_positions[:, None] >= torch.arange(k.shape[2], device=x.device)
        if key_padding_mask is not None:
            if key_padding_mask.dim() == 3:  # a mask per query
                mask = ~key_padding_mask[:, None]  # [B, 1, Lq, Lk] True = attend
            else:
                mask = ~key_padding_mask[:, None, None, :]  # [B, 1, 1, Lk] True = attend
        is_causal = causal and start == 0 and query_length > 1  # one query sees every key
        h = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # [B, H, Lq, hd]
        return self.out(h.transpose(1, 2).reshape(batch, query_length, width))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: float = 4.0, kind: str = "swiglu", dropout: float = 0.0):
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            hidden = int(2 * ratio * width / 3)  # keeps the parameter count of a GELU MLP
            self.up = nn.Linear(width, 2 * hidden, bias=False)
        elif kind == "gelu":
            hidden = int(ratio * width)
            self.up = nn.Linear(width, hidden, bias=False)
        else:
            raise ValueError(f"MLP kind must be swiglu or gelu; got {kind!r}")
        self.down = nn.Linear(hidden, width, bias=False)
        self.down.is_residual_projection = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        return self.dropout(self.down(h))


class Block(nn.Module):
    """x + SelfAttn(norm x) [+ CrossAttn(norm x, context)] + MLP(norm x), all pre-norm."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp: str = "swiglu",
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        cross_attention: bool = False,
        self_attention: bool = True,
    ):
        super().__init__()
        self.self_attention = Attention(width, heads, dropout) if self_attention else None
        self.self_norm = nn.RMSNorm(width) if self_attention else None
        self.cross_attention = Attention(width, heads, dropout) if cross_attention else None
        self.cross_norm = nn.RMSNorm(width) if cross_attention else None
        self.context_norm = nn.RMSNorm(width) if cross_attention else None
        self.mlp_norm = nn.RMSNorm(width)
        self.mlp = MLP(width, mlp_ratio, mlp, dropout)

    def forward(
        self,
        x: torch.Tensor,  # [B, L, D]
        rope: Rope | None = None,
        padding_mask: torch.Tensor | None = None,  # [B, L] True = padding
        context: torch.Tensor | None = None,  # [B, Lc, D]
        context_rope: Rope | None = None,
        context_padding_mask: torch.Tensor | None = None,  # [B, Lc] or [B, L, Lc]
        causal: bool = False,
        cache: KVCache | None = None,  # this block's self-attention cache
    ) -> torch.Tensor:
        if self.self_attention is not None:
            h = self.self_norm(x)
            x = x + self.self_attention(
                h, None, rope, rope, padding_mask, causal=causal, cache=cache
            )
        if self.cross_attention is not None:
            x = x + self.cross_attention(
                self.cross_norm(x),
                self.context_norm(context),
                None,
                context_rope,
                context_padding_mask,
            )
        return x + self.mlp(self.mlp_norm(x))


def init_weights(module: nn.Module, num_layers: int, std: float = 0.02) -> None:
    """GPT-2 initialisation: normal(0, 0.02) for linear and embedding weights, zero biases, and
    residual projections scaled by 1 / sqrt(2 * num_layers)."""
    residual_std = std / math.sqrt(2 * max(num_layers, 1))
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            scale = residual_std if getattr(sub, "is_residual_projection", False) else std
            nn.init.normal_(sub.weight, mean=0.0, std=scale)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
