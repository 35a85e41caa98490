"""Fisher block kinds, one file each, and the registry that maps modules to them.

See :mod:`bigbatch.curvature.blocks.registry` for how to add a kind (one file, one line).
"""

from __future__ import annotations

from bigbatch.curvature.blocks.attention import AttentionProjectionBlock, MultiheadAttentionBlocks
from bigbatch.curvature.blocks.base import FactorValue, FisherBlock, ParamSlice, Sums
from bigbatch.curvature.blocks.conv import Conv2dBlock
from bigbatch.curvature.blocks.embedding import EmbeddingBlock
from bigbatch.curvature.blocks.kronecker import KroneckerBlock
from bigbatch.curvature.blocks.linear import LinearBlock
from bigbatch.curvature.blocks.norm import UnitwiseNormBlock
from bigbatch.curvature.blocks.registry import BLOCK_TYPES, discover

__all__ = [
    "BLOCK_TYPES",
    "AttentionProjectionBlock",
    "Conv2dBlock",
    "EmbeddingBlock",
    "FactorValue",
    "FisherBlock",
    "KroneckerBlock",
    "LinearBlock",
    "MultiheadAttentionBlocks",
    "ParamSlice",
    "Sums",
    "UnitwiseNormBlock",
    "discover",
]
