"""Flax layers on jax_flash (needs flax: `pip install jax_flash[flax]`).

  jax_flash.flax.attention_fn            for flax.linen.MultiHeadDotProductAttention
  jax_flash.flax.FlashMultiHeadAttention linen layer with Flax's parameter tree
  jax_flash.flax.nnx.attention_fn        for flax.nnx.MultiHeadAttention
  jax_flash.flax.nnx.FlashMultiHeadAttention  NNX layer with NNX's parameters
  jax_flash.flax.rotary_embedding        rotary position embeddings
"""

try:
  import flax  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError("jax_flash.flax needs flax: pip install 'jax_flash[flax]'") from e

from . import nnx
from ._core import rotary_embedding
from .linen import FlashMultiHeadAttention, attention_fn

__all__ = ["FlashMultiHeadAttention", "attention_fn", "nnx", "rotary_embedding"]
