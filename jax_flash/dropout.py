"""Dropout on the attention probabilities, from a counter-based random number
generator: nothing is stored, the backward pass regenerates the same mask.

Whether the probability of query i for key j (batch b, head h) is kept is a
pure function of the call's key and of (b, h, i, j): one Philox-4x32-10 block
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) with
counter (i, j // 4, b * num_heads + h, 0) and a 64-bit key drawn from
`dropout_rng` gives four 32-bit words, and word j % 4 keeps the entry when it is
at least rate * 2^32. Every path computes exactly this mask, and
`dropout_mask` returns it for tests and inspection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_U32 = jnp.uint32
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10


def _mulhilo(a: int, b):
  """(high, low) 32-bit halves of the 64-bit product of constant a and b, from
  16-bit pieces (no 64-bit integers needed)."""
  b = b.astype(_U32)
  a_hi, a_lo = _U32(a >> 16), _U32(a & 0xFFFF)
  b_hi, b_lo = b >> 16, b & 0xFFFF
  lo_lo, hi_lo, lo_hi = a_lo * b_lo, a_hi * b_lo, a_lo * b_hi
  middle = (lo_lo >> 16) + (hi_lo & 0xFFFF) + (lo_hi & 0xFFFF)
  high = a_hi * b_hi + (hi_lo >> 16) + (lo_hi >> 16) + (middle >> 16)
  return high, _U32(a) * b


def philox4x32(counter, key):
  """Philox-4x32-10 of four uint32 counter words (arrays of one shape) and two
  uint32 key words; returns the four output words."""
  c0, c1, c2, c3 = (jnp.asarray(c, _U32) for c in counter)
  k0, k1 = (jnp.asarray(k, _U32) for k in key)
  for r in range(ROUNDS):
    if r:
      k0, k1 = k0 + _U32(_KEY_STEPS[0]), k1 + _U32(_KEY_STEPS[1])
    hi0, lo0 = _mulhilo(_MULTIPLIERS[0], c0)
    hi1, lo1 = _mulhilo(_MULTIPLIERS[1], c2)
    c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
  return c0, c1, c2, c3


def seed(dropout_rng):
  """The generator's 64-bit key, as uint32[2], from a JAX random key."""
  return jax.random.bits(dropout_rng, (2,), _U32)


def threshold(rate: float):
  """Words below this drop their entry: rate * 2^32, as a NumPy uint32 (a
  constant, also where it becomes a kernel attribute)."""
  return np.uint32(min(round(rate * 2.0**32), 2**32 - 1))


def keep(seed_words, rate: float, bh, rows, cols):
  """Boolean keep mask of the entries at (bh, rows, cols), broadcast together:
  bh = batch * num_heads + head, rows = query index, cols = key index."""
  rows, cols, bh = (jnp.asarray(x, _U32) for x in (rows, cols, bh))
  shape = jnp.broadcast_shapes(rows.shape, cols.shape, bh.shape)
  counter = [jnp.broadcast_to(x, shape) for x in (rows, cols >> 2, bh)]
  words = philox4x32(counter + [jnp.zeros(shape, _U32)],
                     (seed_words[0], seed_words[1]))
  lane = cols & 3
  word = jnp.select([lane == 0, lane == 1, lane == 2], words[:3], words[3])
  return word >= threshold(rate)


def dropout_mask(dropout_rng, dropout_rate: float, *, batch: int,
                 num_heads: int, seq_q: int, seq_k: int):
  """The keep mask [batch, num_heads, seq_q, seq_k] (True: kept, then scaled by
  1 / (1 - dropout_rate)) that `flash_attention` applies with this key and
  rate, on every path. Quadratic in size: for tests and small inputs."""
  bh = jnp.arange(batch * num_heads).reshape(batch, num_heads, 1, 1)
  rows = jnp.arange(seq_q)[:, None]
  cols = jnp.arange(seq_k)[None, :]
  return keep(seed(dropout_rng), dropout_rate, bh, rows, cols)
