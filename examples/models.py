"""A pre-LayerNorm Transformer in Flax linen whose attention layer is chosen by name.

  jax_flash  jax_flash.flax.FlashMultiHeadAttention (the CUDA kernels on a GPU)
  xla        flax's MultiHeadDotProductAttention on jax.nn.dot_product_attention(implementation="xla")
  cudnn      the same with implementation="cudnn" (GPU, float16/bfloat16 only)

All three have the same parameter tree, so a checkpoint trained with one runs with
the others. Used by examples/train_gpt.py and benchmarks/bench_e2e.py.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jax_flash.flax import FlashMultiHeadAttention  # noqa: E402

ATTENTION = ("jax_flash", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int
  max_len: int
  d_model: int
  n_layers: int
  n_heads: int
  causal: bool = True
  attention: str = "jax_flash"
  dtype: str = "float32"  # computation dtype; parameters stay float32
  remat: bool = False


def _jax_nn_attention(query, key, value, *, is_causal, implementation):
  return jax.nn.dot_product_attention(query, key, value, is_causal=is_causal,
                                      implementation=implementation)


def attention_layer(cfg: Config, name: str):
  if cfg.attention == "jax_flash":
    return FlashMultiHeadAttention(num_heads=cfg.n_heads, causal=cfg.causal, dtype=cfg.dtype,
                                   name=name)
  if cfg.attention not in ATTENTION:
    raise ValueError(f"attention must be one of {ATTENTION}, got {cfg.attention!r}")
  fn = functools.partial(_jax_nn_attention, is_causal=cfg.causal, implementation=cfg.attention)
  return nn.MultiHeadDotProductAttention(num_heads=cfg.n_heads, attention_fn=fn,
                                         dtype=cfg.dtype, name=name)


class Block(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = nn.LayerNorm(dtype=cfg.dtype, name="ln_attn")(x)
    x = x + attention_layer(cfg, "attn")(h)
    h = nn.LayerNorm(dtype=cfg.dtype, name="ln_mlp")(x)
    h = nn.Dense(4 * cfg.d_model, dtype=cfg.dtype, name="mlp_in")(h)
    h = nn.Dense(cfg.d_model, dtype=cfg.dtype, name="mlp_out")(nn.gelu(h))
    return x + h


class Transformer(nn.Module):
  """Token + learned position embeddings, n_layers blocks, logits tied to the embedding."""
  cfg: Config

  @nn.compact
  def __call__(self, tokens):
    cfg = self.cfg
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, name="embed")
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (cfg.max_len, cfg.d_model))
    x = (embed(tokens) + pos[:tokens.shape[-1]]).astype(cfg.dtype)
    block = nn.remat(Block) if cfg.remat else Block
    for i in range(cfg.n_layers):
      x = block(cfg, name=f"block{i}")(x)
    x = nn.LayerNorm(dtype=cfg.dtype, name="ln_final")(x)
    return embed.attend(x.astype(jnp.float32))


def next_token_loss(params, model, tokens):
  """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1]."""
  logits = model.apply(params, tokens[:, :-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return -picked.mean()
