"""Block-sparse attention masks: which (query block, key block) pairs attend.

A `BlockSparseMask` holds a boolean array `blocks` [..., num_q_blocks,
num_k_blocks] (leading dims broadcast over batch and heads) and its
`block_size` (block_q, block_k). Passed as `flash_attention(...,
block_mask=mask)`, query i sees key j only when block (i // block_q, j //
block_k) is on; inside the blocks that are on, attention is exact, and the
blocks that are off are skipped. Building a mask also builds its `index`, the
lists the CUDA kernels walk (per query block the key blocks that are on, per key
block the query blocks), once: every call and every layer that reuses the mask
reads the same lists. A mask is a pytree of `blocks` and the index, so it passes
through `jax.jit`; built outside a jitted step, its lists are inputs of the step.

The constructors give the patterns of the FlashAttention paper's block-sparse
experiments: `local`, `global_blocks`, `butterfly`, `random`, or `from_dense`
for any element mask; `&` and `|` combine them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK_SIZE = (128, 128)


def _num_blocks(length: int, block: int) -> int:
  return -(-length // block)


def _check_block_size(block_size) -> tuple[int, int]:
  if not (isinstance(block_size, (tuple, list)) and len(block_size) == 2
          and all(isinstance(b, (int, np.integer)) and not isinstance(b, bool)
                  and b > 0 for b in block_size)):
    raise ValueError("BlockSparseMask: block_size must be a pair of positive ints "
                     f"(block_q, block_k), got {block_size!r}")
  return int(block_size[0]), int(block_size[1])


def _check_length(name: str, length) -> int:
  if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 1:
    raise ValueError(f"BlockSparseMask: {name} must be a positive int, got {length!r}")
  return int(length)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockIndex:
  """A block mask [..., num_q_blocks, num_k_blocks] as the kernels walk it:
  per query block the key blocks that are on, ascending, then the others (never
  read), and how many are on; per key block the same of the query blocks. Every
  array has the rank of the mask, so one sharding or vmap axis fits them all."""
  q_lists: jax.Array   # int32 [..., num_q_blocks, num_k_blocks]
  q_counts: jax.Array  # int32 [..., num_q_blocks, 1]
  k_lists: jax.Array   # int32 [..., num_k_blocks, num_q_blocks]
  k_counts: jax.Array  # int32 [..., num_k_blocks, 1]

  @classmethod
  def of(cls, blocks) -> "BlockIndex":
    def lists(rows):
      return (jnp.argsort(jnp.logical_not(rows), axis=-1, stable=True).astype(jnp.int32),
              rows.sum(axis=-1, keepdims=True, dtype=jnp.int32))
    return cls(*lists(blocks), *lists(jnp.swapaxes(blocks, -1, -2)))

  def fits(self, blocks) -> bool:
    """Whether the shapes are those of the index of `blocks`."""
    *lead, nq, nk = blocks.shape
    lead = tuple(lead)
    return (tuple(self.q_lists.shape) == (*lead, nq, nk)
            and tuple(self.q_counts.shape) == (*lead, nq, 1)
            and tuple(self.k_lists.shape) == (*lead, nk, nq)
            and tuple(self.k_counts.shape) == (*lead, nk, 1))


@dataclasses.dataclass(frozen=True)
class BlockSparseMask:
  """blocks: bool [..., num_q_blocks, num_k_blocks]; block_size: (block_q,
  block_k), the rows and columns of the score matrix one entry stands for (the
  last block of a sequence may be partly past its end). `index` (`BlockIndex`)
  is built from `blocks` by the constructor; a function mapped over the mask's
  leaves (slicing leading dims, moving it to devices) reaches it too.

  Given something other than an array as `blocks` (a vmap axis, a sharding: a
  prefix of a mask's pytree), the index holds the same for each of its arrays.
  """
  blocks: jax.Array
  block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE
  index: BlockIndex = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, "block_size", _check_block_size(self.block_size))
    blocks = self.blocks
    if isinstance(blocks, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
      if len(blocks.shape) < 2:
        raise ValueError("BlockSparseMask: blocks must be [..., num_q_blocks, "
                         f"num_k_blocks], got shape {tuple(blocks.shape)}")
      if blocks.dtype != jnp.bool_:
        raise TypeError(f"BlockSparseMask: blocks must be boolean, got {blocks.dtype}")
      index = (jax.eval_shape(BlockIndex.of, blocks)
               if isinstance(blocks, jax.ShapeDtypeStruct) else BlockIndex.of(blocks))
    else:
      index = BlockIndex(blocks, blocks, blocks, blocks)
    object.__setattr__(self, "index", index)

  @property
  def num_blocks(self) -> tuple[int, int]:
    """(num_q_blocks, num_k_blocks)."""
    return tuple(self.blocks.shape[-2:])

  def fits(self, seq_q: int, seq_k: int) -> bool:
    """Whether the mask has exactly the blocks that cover these lengths."""
    return self.num_blocks == (_num_blocks(seq_q, self.block_size[0]),
                               _num_blocks(seq_k, self.block_size[1]))

  def density(self):
    """The fraction of blocks that are on (over every leading index too)."""
    return jnp.mean(self.blocks.astype(jnp.float32))

  def dense(self, seq_q: int, seq_k: int):
    """The element mask [..., seq_q, seq_k] this block mask stands for: for
    references and tests (quadratic in size)."""
    if not self.fits(seq_q, seq_k):
      raise ValueError(f"BlockSparseMask: {self.num_blocks} blocks of {self.block_size} "
                       f"do not cover seq_q={seq_q}, seq_k={seq_k}")
    rows = np.arange(seq_q) // self.block_size[0]
    cols = np.arange(seq_k) // self.block_size[1]
    return self.blocks[..., rows[:, None], cols[None, :]]

  def _combine(self, other, op, name):
    if not isinstance(other, BlockSparseMask):
      return NotImplemented
    if other.block_size != self.block_size:
      raise ValueError(f"BlockSparseMask: {name} needs one block_size, got "
                       f"{self.block_size} and {other.block_size}")
    return BlockSparseMask(op(self.blocks, other.blocks), self.block_size)

  def __and__(self, other):
    return self._combine(other, jnp.logical_and, "&")

  def __or__(self, other):
    return self._combine(other, jnp.logical_or, "|")

  # Constructors.

  @classmethod
  def from_dense(cls, mask, block_size=DEFAULT_BLOCK_SIZE) -> "BlockSparseMask":
    """The blocks of an element mask [..., seq_q, seq_k] that hold any True.

    The block mask keeps whole blocks: for the same results as the element
    mask, pass that mask too (`mask=`), or use a mask made of whole blocks.
    """
    block_q, block_k = _check_block_size(block_size)
    mask = jnp.asarray(mask, bool)
    if mask.ndim < 2:
      raise ValueError(f"BlockSparseMask.from_dense: mask must be [..., seq_q, seq_k], "
                       f"got shape {mask.shape}")
    *lead, seq_q, seq_k = mask.shape
    nq, nk = _num_blocks(seq_q, block_q), _num_blocks(seq_k, block_k)
    pad = [(0, 0)] * len(lead) + [(0, nq * block_q - seq_q), (0, nk * block_k - seq_k)]
    mask = jnp.pad(mask, pad).reshape(*lead, nq, block_q, nk, block_k)
    return cls(mask.any(axis=(-3, -1)), (block_q, block_k))

  @classmethod
  def local(cls, seq_q: int, seq_k: int, window_blocks,
            block_size=DEFAULT_BLOCK_SIZE) -> "BlockSparseMask":
    """Blocks within `window_blocks` key blocks of each query block's diagonal
    (bottom-right aligned, as `causal`): an int for both sides or a pair
    (left, right), None on a side for unbounded."""
    block_q, block_k = _check_block_size(block_size)
    seq_q, seq_k = _check_length("seq_q", seq_q), _check_length("seq_k", seq_k)
    left, right = (window_blocks if isinstance(window_blocks, (tuple, list))
                   else (window_blocks, window_blocks))
    for side in (left, right):
      if side is not None and (not isinstance(side, (int, np.integer)) or side < 0):
        raise ValueError("BlockSparseMask.local: window_blocks must be ints >= 0 or None, "
                         f"got {window_blocks!r}")
    nq, nk = _num_blocks(seq_q, block_q), _num_blocks(seq_k, block_k)
    # The diagonal keys of query block i: [i * bq, (i + 1) * bq - 1] + seq_k - seq_q.
    first = np.arange(nq) * block_q + seq_k - seq_q
    last = first + block_q - 1
    key_first = np.arange(nk) * block_k
    key_last = key_first + block_k - 1
    on = np.ones((nq, nk), bool)
    if left is not None:
      on &= key_last[None, :] >= (first[:, None] - left * block_k)
    if right is not None:
      on &= key_first[None, :] <= (last[:, None] + right * block_k)
    return cls(jnp.asarray(on), (block_q, block_k))

  @classmethod
  def global_blocks(cls, seq_q: int, seq_k: int, *, rows=1, cols=1,
                    block_size=DEFAULT_BLOCK_SIZE) -> "BlockSparseMask":
    """Query blocks `rows` see every key and key blocks `cols` are seen by
    every query (global tokens): an int n for the first n blocks, or a
    sequence of block indices."""
    block_q, block_k = _check_block_size(block_size)
    seq_q, seq_k = _check_length("seq_q", seq_q), _check_length("seq_k", seq_k)
    nq, nk = _num_blocks(seq_q, block_q), _num_blocks(seq_k, block_k)

    def indices(name, x, n):
      idx = list(range(min(int(x), n))) if isinstance(x, (int, np.integer)) else list(x)
      if not isinstance(x, (int, np.integer, Sequence)) or any(
          not 0 <= int(i) < n for i in idx):
        raise ValueError(f"BlockSparseMask.global_blocks: {name} must be a count or "
                         f"block indices in [0, {n}), got {x!r}")
      return idx

    on = np.zeros((nq, nk), bool)
    on[indices("rows", rows, nq), :] = True
    on[:, indices("cols", cols, nk)] = True
    return cls(jnp.asarray(on), (block_q, block_k))

  @classmethod
  def butterfly(cls, seq_q: int, seq_k: int,
                block_size=DEFAULT_BLOCK_SIZE) -> "BlockSparseMask":
    """The flat block butterfly: block (i, j) is on when i == j or i XOR j is
    a power of two, the support of the butterfly factors of every size
    (Pixelated Butterfly, Chen et al. 2021, the fixed pattern of
    FlashAttention's block-sparse experiments). log2(n) + 1 blocks per row of
    n."""
    block_q, block_k = _check_block_size(block_size)
    seq_q, seq_k = _check_length("seq_q", seq_q), _check_length("seq_k", seq_k)
    nq, nk = _num_blocks(seq_q, block_q), _num_blocks(seq_k, block_k)
    x = np.arange(nq)[:, None] ^ np.arange(nk)[None, :]
    on = (x & (x - 1)) == 0  # 0 or a power of two
    return cls(jnp.asarray(on), (block_q, block_k))

  @classmethod
  def random(cls, key, density: float, seq_q: int, seq_k: int, *, shape=(),
             block_size=DEFAULT_BLOCK_SIZE) -> "BlockSparseMask":
    """Each block on with probability `density`, independently; `shape`:
    leading dims (e.g. (batch, heads) for a mask per head)."""
    block_q, block_k = _check_block_size(block_size)
    seq_q, seq_k = _check_length("seq_q", seq_q), _check_length("seq_k", seq_k)
    if not 0 <= density <= 1:
      raise ValueError(f"BlockSparseMask.random: density must be in [0, 1], got {density}")
    nq, nk = _num_blocks(seq_q, block_q), _num_blocks(seq_k, block_k)
    return cls(jax.random.bernoulli(key, density, (*shape, nq, nk)), (block_q, block_k))


def _flatten_mask(mask):
  return (mask.blocks, mask.index), mask.block_size


def _unflatten_mask(block_size, children):
  # Leaves come back as they went (arrays, tracers, placeholders): the index is
  # theirs, not rebuilt.
  mask = object.__new__(BlockSparseMask)
  for name, value in zip(("blocks", "index"), children):
    object.__setattr__(mask, name, value)
  object.__setattr__(mask, "block_size", block_size)
  return mask


jax.tree_util.register_pytree_node(BlockSparseMask, _flatten_mask, _unflatten_mask)

