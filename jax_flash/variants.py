"""What a call asks beyond softmax(scale * q k^T) v: windows, a soft cap, ALiBi,
segments, a dense mask or bias, and dropout.

`Variant` is the static part (it selects code); the arrays (ALiBi slopes, segment
ids, mask, bias, the dropout generator's key) travel beside it in a dict keyed
by `ARRAY_NAMES`.

A call that computes one shard of a larger attention (a device's part under
sharding, one step of ring attention) carries a `Frame`: the positions that
windows, ALiBi and dropout read are then those of the larger attention.
"""

from __future__ import annotations

import dataclasses

# A block-sparse mask's lists (`block_sparse.BlockIndex`), as the kernels read them.
BLOCK_INDEX_NAMES = ("block_q_lists", "block_q_counts", "block_k_lists", "block_k_counts")
ARRAY_NAMES = ("alibi_slopes", "q_segment_ids", "kv_segment_ids", "mask", "bias",
               "block_mask", *BLOCK_INDEX_NAMES, "dropout_seed", "origin")
UNBOUNDED = -1


@dataclasses.dataclass(frozen=True)
class Frame:
  """The larger attention a call is a shard of: its number of query heads and
  its seq_k - seq_q. The call's arrays then include "origin", int32 [4]: the
  (batch, head, query, key) indices in the larger attention of its first
  batch row, head, query and key."""
  num_heads: int
  diagonal: int


@dataclasses.dataclass(frozen=True)
class Variant:
  """window: (left, right) keys around the query's diagonal, UNBOUNDED for no
  limit; softcap and dropout_rate: 0 for none; the flags say which arrays come
  with the call; block_size: that of a block-sparse mask (its blocks come as
  the array "block_mask", [batch', heads', num_q_blocks, num_k_blocks], and its
  index as the BLOCK_INDEX_NAMES, [batch', heads', ...]), None without one; frame: None, or the larger attention this call is a shard
  of."""
  window: tuple[int, int] = (UNBOUNDED, UNBOUNDED)
  softcap: float = 0.0
  alibi: bool = False
  segments: bool = False
  mask: bool = False
  bias: bool = False
  dropout_rate: float = 0.0
  block_size: tuple[int, int] | None = None
  frame: Frame | None = None

  @property
  def positional(self) -> bool:
    """Whether the scores or the mask depend on where a query and key sit
    (not only on whether the key comes after the query's diagonal)."""
    return (self.window != (UNBOUNDED, UNBOUNDED) or self.alibi
            or bool(self.dropout_rate))

  @property
  def features(self) -> tuple[str, ...]:
    """The arguments this variant uses beyond plain attention, by name."""
    return tuple(name for name, used in (
        ("window_size", self.window != (UNBOUNDED, UNBOUNDED)),
        ("softcap", self.softcap != 0.0),
        ("alibi_slopes", self.alibi),
        ("segment_ids", self.segments),
        ("mask", self.mask),
        ("bias", self.bias),
        ("block_mask", self.block_size is not None),
        ("dropout_rate", self.dropout_rate != 0.0)) if used)
