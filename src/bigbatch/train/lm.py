"""A GPT-style causal transformer for character-level language modelling (``model.name=gpt``).

Token and position embeddings, ``depth`` pre-norm blocks (attention then a 4x MLP with
GELU, each with a residual), a final LayerNorm and a head tied to the token embedding
(``logits = h E^T``, through ``F.linear``). Two block implementations, chosen by
``attention``:

- ``"mha"``: ``nn.TransformerEncoderLayer(norm_first=True, batch_first=True)`` with a
  causal mask: attention is ``nn.MultiheadAttention`` (its packed ``in_proj_weight``);
- ``"linear"``: the same block written out with ``nn.Linear`` query/key/value/output
  projections and ``F.scaled_dot_product_attention(is_causal=True)``.

Both are built only from modules with Fisher blocks (Embedding, Linear, MultiheadAttention,
LayerNorm), so SP-NGD preconditions every parameter. Initialisation: normal(0, 0.02) for
embeddings and projections, residual output projections scaled by ``1 / sqrt(2 depth)``
(GPT-2), biases zero, LayerNorm weight 1. Not here: data, training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ATTENTION_KINDS", "CausalLM", "LinearAttentionBlock"]

ATTENTION_KINDS = ("mha", "linear")


class LinearAttentionBlock(nn.Module):
    """A pre-norm transformer block with ``nn.Linear`` projections and SDPA."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.linear1 = nn.Linear(width, 4 * width)
        self.linear2 = nn.Linear(4 * width, width)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        h = self.norm1(x)
        q, k, v = (
            lin(h).view(n, t, self.heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v)
        )
        p = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        x = x + F.dropout(self.out(att.transpose(1, 2).reshape(n, t, c)), p, self.training)
        mlp = self.linear2(F.gelu(self.linear1(self.norm2(x))))
        return x + F.dropout(mlp, p, self.training)


class CausalLM(nn.Module):
    """Next-token logits ``(N, T, vocab)`` for token indices ``(N, T)``, ``T <= context``."""

    def __init__(
        self,
        vocab: int,
        context: int,
        *,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        attention: str = "mha",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.context = context
        self.attention = attention
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        blocks: list[nn.Module] = []
        for _ in range(depth):
            if attention == "mha":
                blocks.append(
                    nn.TransformerEncoderLayer(
                        width,
                        heads,
                        4 * width,
                        dropout=dropout,
                        activation="gelu",
                        batch_first=True,
                        norm_first=True,
                    )
                )
            else:
                blocks.append(LinearAttentionBlock(width, heads, dropout))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(width)
        self._init(depth)

    def _init(self, depth: int) -> None:
        residual = 0.02 / math.sqrt(2 * depth)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                if name.endswith("weight"):
                    nn.init.ones_(p)
                else:
                    nn.init.zeros_(p)
            elif name.endswith(("out_proj.weight", "out.weight", "linear2.weight")):
                nn.init.normal_(p, std=residual)
            else:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        n, t = idx.shape
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context ({self.context})")
        positions = torch.arange(t, device=idx.device).expand(n, t)
        h = self.tok(idx) + self.pos(positions)
        if self.attention == "mha":
            mask = nn.Transformer.generate_square_subsequent_mask(
                t, device=idx.device, dtype=h.dtype
            )
            for block in self.blocks:
                h = block(h, src_mask=mask, is_causal=True)
        else:
            for block in self.blocks:
                h = block(h)
        return F.linear(self.norm(h), self.tok.weight)
