"""What a call asks beyond softmax(scale * q k^T) v: windows, a soft cap, ALiBi,
segments, a dense mask or bias, and dropout.

`Variant` is the static part (it selects code); the arrays (ALiBi slopes, segment
ids, mask, bias, the dropout generator's key) travel beside it in a dict keyed
by `ARRAY_NAMES`.
"""

from __future__ import annotations

import dataclasses

ARRAY_NAMES = ("alibi_slopes", "q_segment_ids", "kv_segment_ids", "mask", "bias",
               "dropout_seed")
UNBOUNDED = -1


@dataclasses.dataclass(frozen=True)
class Variant:
  """window: (left, right) keys around the query's diagonal, UNBOUNDED for no
  limit; softcap and dropout_rate: 0 for none; the flags say which arrays come
  with the call."""
  window: tuple[int, int] = (UNBOUNDED, UNBOUNDED)
  softcap: float = 0.0
  alibi: bool = False
  segments: bool = False
  mask: bool = False
  bias: bool = False
  dropout_rate: float = 0.0

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
        ("dropout_rate", self.dropout_rate != 0.0)) if used)
