"""The CUDA kernels against the reference: the specification on a GPU.

Every comparison follows the design brief's rule: the kernel may be at most 2x
(out, lse) or 3x (dq, dk, dv) as far from an fp32 reference as a plain
same-dtype attention is. The whole module skips when no CUDA device is visible
or the kernel library is not loaded.
"""

import functools
import os
import pathlib
import subprocess
import sys
import tempfile
import unittest
import zlib

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

import jax_flash
from jax_flash import _cuda
import util


def _cuda_skip_reason() -> str:
  try:
    jax.devices("cuda")
  except RuntimeError as e:
    return f"no CUDA device: {e}"
  if not _cuda.available():
    return f"jax_flash CUDA kernels unavailable: {_cuda.unavailable_reason()}"
  return ""


_SKIP_REASON = _cuda_skip_reason()
_needs_cuda = unittest.skipIf(bool(_SKIP_REASON), _SKIP_REASON)

_DTYPES = {"f16": jnp.float16, "bf16": jnp.bfloat16}
cuda_attention = functools.partial(jax_flash.flash_attention,
                                   implementation="cuda")


def _inputs(name, **shape):
  """Fresh normal q, k, v, dout and dlse, distinct and reproducible per name."""
  return util.random_inputs(zlib.crc32(name.encode()), **shape)


def _flash(causal, implementation="cuda"):
  """(q, k, v) -> (out, lse)."""
  return functools.partial(jax_flash.flash_attention, causal=causal,
                           return_lse=True, implementation=implementation)


def _value_and_grads(fn, q, k, v, dout, dlse):
  """(out, lse, dq, dk, dv) with cotangents on both out and lse."""
  (out, lse), pullback = jax.vjp(fn, q, k, v)
  return (out, lse, *pullback((dout, dlse)))


def _assert_grads_repeat_bitwise(fn, inputs, *, runs: int):
  """dq, dk, dv of fn (returning (out, lse)) bitwise equal over `runs` runs."""
  grads = jax.jit(lambda *a: _value_and_grads(fn, *a)[2:])
  first = [np.asarray(g).view(np.uint16) for g in jax.device_get(grads(*inputs))]
  for _ in range(runs - 1):
    for name, want, got in zip(("dq", "dk", "dv"), first, jax.device_get(grads(*inputs))):
      np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want, name)


def _assert_finite(testcase, name, x):
  x = np.asarray(x, dtype=np.float32)
  bad = int(np.size(x) - np.isfinite(x).sum())
  testcase.assertEqual(bad, 0, f"{name}: {bad} non-finite values")


def _assert_same_up_to_rounding(testcase, name, got, want):
  """Two evaluations of one computation that may round differently."""
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  testcase.assertEqual(got.shape, want.shape, name)
  _assert_finite(testcase, name, got)
  eps = 2.0 ** -7  # bf16, the coarser of the two dtypes
  err = float(np.max(np.abs(got - want), initial=0.0))
  bound = 4 * eps * float(np.max(np.abs(want), initial=0.0)) + 1e-5
  testcase.assertLessEqual(err, bound, f"{name}: max abs diff {err} > {bound}")


# -- the case matrix ---------------------------------------------------------

# (seq_q, seq_k): odd lengths, seq_q != seq_k both ways, a long one.
_LENGTHS = (
    (1, 1), (3, 3), (113, 113), (203, 203), (1023, 1023), (1025, 1025),
    (4096, 4096), (113, 203), (203, 113), (1, 1025), (1025, 1),
)
_HEAD_DIMS = (32, 59, 64, 96, 128, 160, 256)
# (heads, kv_heads): MHA, MQA, GQA.
_HEAD_LAYOUTS = ((4, 4), (8, 1), (8, 2))


def _matrix_cases():
  """Lengths x head dims; heads, causal and dtype rotate so that every head dim
  meets both dtypes with and without the causal mask, and every length meets
  both dtypes, both masks and all head layouts."""
  cases = []
  for i, (seq_q, seq_k) in enumerate(_LENGTHS):
    for j, head_dim in enumerate(_HEAD_DIMS):
      heads, kv_heads = _HEAD_LAYOUTS[(i + j) % len(_HEAD_LAYOUTS)]
      causal = (i + j) % 2 == 0
      dtype = ("f16", "bf16")[(i // 2 + j) % 2]
      batch = 1 if seq_q * seq_k > 2**20 else 2
      name = (f"_q{seq_q}_k{seq_k}_d{head_dim}_h{heads}kv{kv_heads}_"
              f"{'causal' if causal else 'full'}_{dtype}")
      cases.append(dict(testcase_name=name, batch=batch, seq_q=seq_q,
                        seq_k=seq_k, heads=heads, kv_heads=kv_heads,
                        head_dim=head_dim, causal=causal, dtype=dtype))
  return cases


@_needs_cuda
class CudaMatchesReferenceTest(parameterized.TestCase):

  def _check_against_reference(self, *, batch, seq_q, seq_k, heads, kv_heads,
                               head_dim, causal, dtype, softmax_scale=None):
    q, k, v, dout, dlse = _inputs(
        self.id(), batch=batch, seq_q=seq_q, seq_k=seq_k, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, dtype=_DTYPES[dtype])
    out, lse, dq, dk, dv = util.assert_matches_reference(
        cuda_attention, q, k, v, dout, dlse, causal=causal,
        softmax_scale=softmax_scale)

    self.assertEqual(out.shape, q.shape)
    self.assertEqual(lse.shape, (batch, heads, seq_q))
    for name, g, x in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
      self.assertEqual(g.shape, x.shape, name)
    # Bottom-right aligned: query i sees keys j <= i + seq_k - seq_q, so with
    # seq_q > seq_k the first seq_q - seq_k rows see none.
    empty = max(0, seq_q - seq_k) if causal else 0
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv),
                    ("lse of rows with keys", lse[..., empty:])):
      _assert_finite(self, name, x)
    if empty:
      np.testing.assert_array_equal(np.asarray(out[:, :empty], np.float32), 0)
      np.testing.assert_array_equal(np.asarray(lse[..., :empty]), -np.inf)
      np.testing.assert_array_equal(np.asarray(dq[:, :empty], np.float32), 0)

  @parameterized.named_parameters(*_matrix_cases())
  def test_forward_lse_and_grads_match_reference(self, **case):
    self._check_against_reference(**case)

  @parameterized.named_parameters(
      dict(testcase_name="_q203_k113_f16", seq_q=203, seq_k=113, dtype="f16"),
      dict(testcase_name="_q1025_k1_bf16", seq_q=1025, seq_k=1, dtype="bf16"),
      dict(testcase_name="_q130_k3_bf16", seq_q=130, seq_k=3, dtype="bf16"),
      dict(testcase_name="_q4096_k1023_f16", seq_q=4096, seq_k=1023,
           dtype="f16"),
  )
  def test_causal_rows_without_keys_are_zero(self, seq_q, seq_k, dtype):
    # out 0, lse -inf and finite grads, with a nonzero lse cotangent on those
    # rows; the checks live in _check_against_reference.
    self._check_against_reference(batch=2, seq_q=seq_q, seq_k=seq_k, heads=8,
                                  kv_heads=2, head_dim=64, causal=True,
                                  dtype=dtype)

  @parameterized.named_parameters(
      dict(testcase_name="_16k_causal_gqa_d128", seq=16384, heads=4,
           kv_heads=2, head_dim=128, causal=True),
      dict(testcase_name="_64k_full_d64", seq=65536, heads=2, kv_heads=2,
           head_dim=64, causal=False),
      dict(testcase_name="_64k_causal_mqa_d64", seq=65536, heads=2,
           kv_heads=1, head_dim=64, causal=True),
  )
  def test_long_sequences_match_reference_on_sampled_rows(
      self, seq, heads, kv_heads, head_dim, causal):
    # The full reference would need seq^2 scores; a query row's output, lse and
    # dq depend only on that row and on all keys, so blocks of rows at the
    # start, middle and end are checked against the reference run on them alone.
    q, k, v, dout, dlse = _inputs(
        self.id(), batch=1, seq_q=seq, seq_k=seq, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, dtype=jnp.bfloat16)
    out, lse, dq, dk, dv = util.outputs_and_grads(
        _flash(causal), q, k, v, dout, dlse)
    for name, x in (("dk", dk), ("dv", dv)):
      _assert_finite(self, name, x)
    rows = 128
    for start in (0, seq // 2 - 57, seq - rows):
      stop = start + rows
      # Causal row i sees keys j <= i; keeping keys [0, stop) preserves that.
      keys = slice(0, stop if causal else seq)
      sub = (q[:, start:stop], k[:, keys], v[:, keys], dout[:, start:stop],
             dlse[..., start:stop])
      refs = []
      for compute_dtype, inputs in ((jnp.float32, [x.astype(jnp.float32)
                                                   for x in sub[:4]]),
                                    (None, list(sub[:4]))):
        reference = functools.partial(
            jax_flash.attention_reference, causal=causal, return_lse=True,
            compute_dtype=compute_dtype)
        refs.append(util.outputs_and_grads(reference, *inputs, sub[4]))
      got = (out[:, start:stop], lse[..., start:stop], dq[:, start:stop])
      for (name, factor), g, r32, rlow in zip(
          (("out", 2), ("lse", 2), ("dq", 3)), got, refs[0], refs[1]):
        util.assert_close_to_reference(g, r32, rlow, factor,
                                       name=f"{name} rows {start}:{stop}")

  @parameterized.named_parameters(
      # On sm90 the backward shares the non-causal key blocks of its last wave
      # among several blocks of threads, each adding a run of query blocks'
      # partial dK/dV to the key block's sums (cuda/sm90/bwd_split.h). Two key
      # blocks of 16 steps: each in 8 runs.
      dict(testcase_name="_two_key_blocks_d128", batch=1, seq_q=1000,
           seq_k=256, heads=1, kv_heads=1, head_dim=128, dtype="bf16"),
      # GQA: a key block's steps go over its 4 query heads, 3 query blocks
      # each, so runs start and end inside a head's blocks; a partial last
      # key block.
      dict(testcase_name="_gqa_runs_across_heads_d64", batch=1, seq_q=300,
           seq_k=300, heads=8, kv_heads=2, head_dim=64, dtype="f16"),
      # 144 key blocks: on 132 SMs one wave of whole key blocks, then the
      # last 12 in runs.
      dict(testcase_name="_whole_and_shared_d128", batch=1, seq_q=512,
           seq_k=4608, heads=4, kv_heads=4, head_dim=128, dtype="bf16"),
  )
  def test_shared_key_blocks_match_reference(self, **case):
    self._check_against_reference(causal=False, **case)

  @parameterized.named_parameters(
      # On sm90 the head_dim 64 forward's tiles are 192 rows, three warpgroups
      # of 64, each passing its turns at the key blocks none of its rows see.
      # 1000 rows: the first tile starts 152 rows before 0, so two warpgroups
      # pass every key block.
      dict(testcase_name="_rows_before_0_full", seq_q=1000, seq_k=1000,
           causal=False, dtype="bf16"),
      # Causal, 2048: tiles from row -64 in steps of 192 over blocks of 128
      # keys; warpgroups pass 0, 1 or 2 leading key blocks.
      dict(testcase_name="_causal_diagonal", seq_q=2048, seq_k=2048,
           causal=True, dtype="f16"),
      # Causal, more queries than keys: the tile from row 316 sees one key
      # block, which its first warpgroup's rows (none sees a key) pass.
      dict(testcase_name="_causal_rows_without_keys", seq_q=700, seq_k=300,
           causal=True, dtype="bf16"),
  )
  def test_warpgroups_pass_key_blocks_their_rows_do_not_see(self, **case):
    self._check_against_reference(batch=2, heads=4, kv_heads=2, head_dim=64,
                                  **case)

  @parameterized.named_parameters(
      dict(testcase_name="_d64_full", head_dim=64, causal=False, scale=0.3),
      dict(testcase_name="_d59_causal", head_dim=59, causal=True, scale=1.7),
  )
  def test_softmax_scale(self, head_dim, causal, scale):
    self._check_against_reference(batch=2, seq_q=257, seq_k=300, heads=4,
                                  kv_heads=4, head_dim=head_dim, causal=causal,
                                  dtype="bf16", softmax_scale=scale)


@_needs_cuda
class CudaWindowTest(parameterized.TestCase):
  """Sliding windows and the soft cap on the kernels (on Hopper the sm90
  forward and the sm80 backward): only the key blocks a window reaches are
  visited, in both passes."""

  @parameterized.named_parameters(
      ("_d64_causal_left", 64, True, 1000, 1000, (128, 0), 4, 2, "bf16"),
      ("_d128_both_sides", 128, False, 777, 1300, (200, 77), 4, 4, "f16"),
      ("_d64_right_only_more_queries", 64, False, 1500, 600, (-1, 33), 2, 1, "bf16"),
      ("_d256_narrow_causal", 256, True, 515, 300, (7, None), 2, 2, "bf16"),
      ("_d128_left_only", 128, False, 2048, 2048, (300, -1), 8, 2, "f16"),
  )
  def test_forward_lse_and_grads_match_reference(self, head_dim, causal, seq_q, seq_k,
                                                 window, heads, kv_heads, dtype):
    q, k, v, dout, dlse = _inputs(self.id(), batch=2, seq_q=seq_q, seq_k=seq_k,
                                  num_heads=heads, num_kv_heads=kv_heads,
                                  head_dim=head_dim, dtype=_DTYPES[dtype])
    util.assert_matches_reference(cuda_attention, q, k, v, dout, dlse, causal=causal,
                                  window_size=window)

  @parameterized.named_parameters(
      ("_d64_causal_gqa", 64, True, 1000, 1000, None, "bf16"),
      ("_d128_full_window", 128, False, 777, 1300, (150, 150), "f16"),
      ("_d256_causal", 256, True, 515, 300, None, "bf16"),
  )
  def test_soft_cap_matches_reference(self, head_dim, causal, seq_q, seq_k, window, dtype):
    q, k, v, dout, dlse = _inputs(self.id(), batch=2, seq_q=seq_q, seq_k=seq_k,
                                  num_heads=4, num_kv_heads=2, head_dim=head_dim,
                                  dtype=_DTYPES[dtype])
    # Scores of normal inputs reach ~4 sqrt(head_dim) / sqrt(head_dim): a cap of 2
    # bends most of them.
    util.assert_matches_reference(cuda_attention, q, k, v, dout, dlse, causal=causal,
                                  window_size=window, softcap=2.0)

  def test_deterministic_windowed_backward_is_bitwise_repeatable(self):
    q, k, v, dout, dlse = _inputs(self.id(), batch=1, seq_q=1100, seq_k=1100,
                                  num_heads=4, num_kv_heads=2, head_dim=64,
                                  dtype=jnp.bfloat16)
    fn = functools.partial(cuda_attention, deterministic=True, causal=True,
                           window_size=(300, 0), return_lse=True)
    util.assert_matches_reference(
        lambda *a, **kw: fn(*a), q, k, v, dout, dlse, causal=True, window_size=(300, 0))
    _assert_grads_repeat_bitwise(fn, (q, k, v, dout, dlse), runs=10)


@_needs_cuda
class CudaSegmentAlibiDropoutTest(parameterized.TestCase):
  """Packed documents, ALiBi and dropout on the kernels (on Hopper the sm90
  forward but for dropout, the sm80 backward), alone and with causal masks, windows, the soft cap and GQA."""

  def _inputs(self, *, seq_q, seq_k, heads=4, kv_heads=2, head_dim=64, dtype="bf16"):
    return _inputs(self.id(), batch=2, seq_q=seq_q, seq_k=seq_k, num_heads=heads,
                   num_kv_heads=kv_heads, head_dim=head_dim, dtype=_DTYPES[dtype])

  @staticmethod
  def _segment_ids(kind, seq_q, seq_k):
    if kind == "packed":  # sorted documents, the same cuts for queries and keys
      ids = util.packed_segments(5, 2, max(seq_q, seq_k), 7)
      return ids[:, :seq_q], ids[:, :seq_k]
    if kind == "padded":  # documents, then query padding that matches no key
      q_ids = util.packed_segments(6, 2, seq_q, 4)
      q_ids = jnp.where(jnp.arange(seq_q) >= seq_q - 100, -1, q_ids)
      return q_ids, util.packed_segments(6, 2, seq_k, 4)
    # Unsorted ids: every block pair can meet and needs the per-element test.
    keys = jax.random.split(jax.random.key(7))
    return (jax.random.randint(keys[0], (2, seq_q), 0, 3, jnp.int32),
            jax.random.randint(keys[1], (2, seq_k), 0, 3, jnp.int32))

  @parameterized.named_parameters(
      ("_d64_packed_causal", 64, True, 1000, 1000, "packed", {}, "bf16"),
      ("_d128_padded", 128, False, 777, 1300, "padded", {}, "f16"),
      ("_d64_unsorted_gqa", 64, False, 600, 900, "unsorted", {}, "bf16"),
      ("_d256_packed_window", 256, True, 515, 515, "packed",
       dict(window_size=(100, 0)), "bf16"),
      ("_d128_packed_softcap", 128, False, 1100, 1100, "packed", dict(softcap=2.0),
       "bf16"),
  )
  def test_segments_match_reference(self, head_dim, causal, seq_q, seq_k, kind, more,
                                    dtype):
    q, k, v, dout, dlse = self._inputs(seq_q=seq_q, seq_k=seq_k, head_dim=head_dim,
                                       dtype=dtype)
    util.assert_matches_reference(cuda_attention, q, k, v, dout, dlse, causal=causal,
                                  segment_ids=self._segment_ids(kind, seq_q, seq_k),
                                  **more)

  def test_deterministic_backward_with_segments_is_bitwise_repeatable(self):
    q, k, v, dout, dlse = self._inputs(seq_q=1100, seq_k=1100)
    segments = self._segment_ids("packed", 1100, 1100)
    fn = functools.partial(cuda_attention, deterministic=True, causal=True,
                           segment_ids=segments, return_lse=True)
    util.assert_matches_reference(lambda *a, **kw: fn(*a), q, k, v, dout, dlse,
                                  causal=True, segment_ids=segments)
    _assert_grads_repeat_bitwise(fn, (q, k, v, dout, dlse), runs=10)

  @parameterized.named_parameters(
      ("_d64_causal_heads", 64, True, 1000, 1000, (4,), {}, "bf16"),
      ("_d128_batch_heads_window", 128, False, 777, 1300, (2, 4),
       dict(window_size=(300, 50)), "f16"),
      ("_d256_softcap", 256, True, 515, 300, (4,), dict(softcap=2.0), "bf16"),
  )
  def test_alibi_and_its_slope_gradient_match_reference(self, head_dim, causal, seq_q,
                                                        seq_k, slopes_shape, more, dtype):
    q, k, v, dout, dlse = self._inputs(seq_q=seq_q, seq_k=seq_k, head_dim=head_dim,
                                       dtype=dtype)
    slopes = jax.random.uniform(jax.random.key(8), slopes_shape, jnp.float32, 0.005, 0.05)
    util.assert_matches_reference(cuda_attention, q, k, v, dout, dlse, causal=causal,
                                  alibi_slopes=slopes, **more)

    def slope_grad(attention, *arrays):
      def loss(slopes):
        out, lse = attention(*arrays[:3], causal=causal, alibi_slopes=slopes,
                             return_lse=True, **more)
        lse = jnp.where(jnp.isfinite(lse), lse, 0)
        return (jnp.sum(out.astype(jnp.float32) * arrays[3].astype(jnp.float32))
                + jnp.sum(lse * arrays[4]))
      return jax.jit(jax.grad(loss))(slopes)

    got = slope_grad(cuda_attention, q, k, v, dout, dlse)
    ref32 = slope_grad(functools.partial(jax_flash.attention_reference,
                                         compute_dtype=jnp.float32),
                       *(x.astype(jnp.float32) for x in (q, k, v, dout)), dlse)
    ref_lowp = slope_grad(jax_flash.attention_reference, q, k, v, dout, dlse)
    self.assertEqual(got.shape, slopes.shape)
    util.assert_close_to_reference(got, ref32, ref_lowp, util.GRAD_FACTOR,
                                   name="dslopes")

  @parameterized.named_parameters(
      ("_d64_causal", 64, True, 1000, 1000, 0.2, {}, "bf16"),
      ("_d128_segments_gqa", 128, False, 777, 1300, 0.1,
       dict(segment_ids="packed"), "f16"),
      ("_d256_window_alibi", 256, True, 515, 515, 0.3,
       dict(window_size=(200, 0), alibi_slopes=True), "bf16"),
  )
  def test_dropout_matches_reference_with_the_same_mask(self, head_dim, causal, seq_q,
                                                        seq_k, rate, more, dtype):
    q, k, v, dout, dlse = self._inputs(seq_q=seq_q, seq_k=seq_k, head_dim=head_dim,
                                       dtype=dtype)
    more = dict(more)
    if "segment_ids" in more:
      more["segment_ids"] = self._segment_ids(more["segment_ids"], seq_q, seq_k)
    if "alibi_slopes" in more:
      more["alibi_slopes"] = jnp.linspace(0.01, 0.04, 4, dtype=jnp.float32)
    rng = jax.random.key(9)
    mask = jax_flash.dropout_mask(rng, rate, batch=2, num_heads=4, seq_q=seq_q,
                                  seq_k=seq_k)

    def attention(q, k, v, dropout_mask=None, **kwargs):
      del dropout_mask  # the kernels draw it themselves
      return cuda_attention(q, k, v, dropout_rng=rng, **kwargs)

    # A mask other than the reference's (the portable path's) would move the
    # results far beyond the rule.
    util.assert_matches_reference(attention, q, k, v, dout, dlse, causal=causal,
                                  dropout_rate=rate, dropout_mask=mask, **more)
    # The same key draws the same mask: results and gradients repeat bitwise
    # (dQ's additions in a fixed order).
    fn = functools.partial(attention, causal=causal, dropout_rate=rate,
                           deterministic=True, return_lse=True, **more)
    runs = [jax.device_get(jax.jit(lambda *a: _value_and_grads(fn, *a))(q, k, v, dout, dlse))
            for _ in range(2)]
    for name, first, second in zip(util.RESULT_NAMES, *runs):
      np.testing.assert_array_equal(np.asarray(first), np.asarray(second), name)

  @parameterized.named_parameters(
      ("_d192_v128_causal", 192, 128, True, {}, "bf16"),
      ("_d64_v128_window", 64, 128, False, dict(window_size=(100, 30)), "f16"),
      ("_d128_v64_segments", 128, 64, True, dict(segment_ids="packed"), "bf16"),
  )
  def test_value_head_dim_of_its_own_matches_reference(self, head_dim, head_dim_v, causal,
                                                        more, dtype):
    q, k, _, _, dlse = self._inputs(seq_q=700, seq_k=900, head_dim=head_dim, dtype=dtype)
    keys = jax.random.split(jax.random.key(10))
    v = jax.random.normal(keys[0], k.shape[:3] + (head_dim_v,)).astype(q.dtype)
    dout = jax.random.normal(keys[1], q.shape[:3] + (head_dim_v,)).astype(q.dtype)
    more = dict(more)
    if "segment_ids" in more:
      more["segment_ids"] = self._segment_ids(more["segment_ids"], 700, 900)
    got = util.assert_matches_reference(cuda_attention, q, k, v, dout, dlse,
                                        causal=causal, **more)
    self.assertEqual(got[0].shape, q.shape[:3] + (head_dim_v,))


@_needs_cuda
class CudaBlockSparseTest(parameterized.TestCase):
  """Block-sparse masks on the kernels (on Hopper the sm90 family, the sm80
  backward when deterministic): only the tiles of blocks that are on are
  visited, forward and backward."""

  def _inputs(self, *, seq_q, seq_k, heads=4, kv_heads=2, head_dim=64, dtype="bf16"):
    return _inputs(self.id(), batch=2, seq_q=seq_q, seq_k=seq_k, num_heads=heads,
                   num_kv_heads=kv_heads, head_dim=head_dim, dtype=_DTYPES[dtype])

  @parameterized.named_parameters(
      ("_d64_quarter_causal", 64, True, 1000, 1000, 0.25, (), (128, 128), {}, "bf16"),
      ("_d128_half_per_head", 128, False, 777, 1300, 0.5, (4,), (128, 128), {}, "f16"),
      ("_d256_per_batch_and_head_gqa", 256, True, 515, 700, 0.4, (2, 4), (256, 128), {},
       "bf16"),
      ("_d64_wide_blocks_window", 64, False, 1500, 1500, 0.5, (), (128, 384),
       dict(window_size=(500, 200)), "bf16"),
      ("_d128_segments_softcap", 128, True, 1100, 1100, 0.6, (4,), (128, 128),
       dict(segment_ids="packed", softcap=2.0), "bf16"),
      ("_d64_alibi", 64, False, 900, 900, 0.5, (), (128, 128), dict(alibi_slopes=True),
       "bf16"),
  )
  def test_block_mask_matches_reference(self, head_dim, causal, seq_q, seq_k, density, lead,
                                        block_size, more, dtype):
    q, k, v, dout, dlse = self._inputs(seq_q=seq_q, seq_k=seq_k, head_dim=head_dim,
                                       dtype=dtype)
    m = jax_flash.BlockSparseMask.random(jax.random.key(11), density, seq_q, seq_k,
                                         shape=lead, block_size=block_size)
    more = dict(more)
    if "segment_ids" in more:
      ids = util.packed_segments(5, 2, seq_q, 5)
      more["segment_ids"] = (ids, ids)
    if "alibi_slopes" in more:
      more["alibi_slopes"] = jnp.linspace(0.01, 0.04, 4, dtype=jnp.float32)

    def attention(q, k, v, mask=None, **kwargs):
      del mask  # the reference's element mask; the kernels take the blocks
      return cuda_attention(q, k, v, block_mask=m, **kwargs)

    util.assert_matches_reference(attention, q, k, v, dout, dlse, causal=causal,
                                  mask=m.dense(seq_q, seq_k), **more)

  @parameterized.named_parameters(
      ("_d64_few_steps", 64, 0.08),
      ("_d64_many_steps", 64, 0.5),
      ("_d128", 128, 0.3),
  )
  def test_more_key_blocks_than_sms(self, head_dim, density):
    # 256 key blocks: the persistent backward's blocks take two or more each,
    # key blocks of few steps (KVSlots' short cases at head_dim 64) among them.
    seq = 4096
    q, k, v, dout, dlse = _inputs(self.id(), batch=1, seq_q=seq, seq_k=seq, num_heads=8,
                                  num_kv_heads=8, head_dim=head_dim, dtype=jnp.bfloat16)
    m = jax_flash.BlockSparseMask.random(jax.random.key(3), density, seq, seq, shape=(8,))

    def attention(q, k, v, mask=None, **kwargs):
      del mask  # the reference's element mask; the kernels take the blocks
      return cuda_attention(q, k, v, block_mask=m, **kwargs)

    util.assert_matches_reference(attention, q, k, v, dout, dlse, causal=False,
                                  mask=m.dense(seq, seq))

  def test_rows_whose_blocks_are_all_off_give_zero_and_finite_grads(self):
    q, k, v, dout, _ = self._inputs(seq_q=512, seq_k=512)
    m = jax_flash.BlockSparseMask(jnp.ones((4, 4), bool).at[2].set(False), (128, 128))
    out, lse = cuda_attention(q, k, v, block_mask=m, return_lse=True)
    np.testing.assert_array_equal(np.asarray(out[:, 256:384], np.float32), 0)
    self.assertTrue(np.isneginf(np.asarray(lse[..., 256:384])).all())
    grads = jax.grad(lambda q, k, v: jnp.sum(
        cuda_attention(q, k, v, block_mask=m).astype(jnp.float32) * dout),
        argnums=(0, 1, 2))(q, k, v)
    for g in grads:
      self.assertTrue(np.isfinite(np.asarray(g, np.float32)).all())

  def test_vmapped_masks_each_shared_by_their_examples_batch(self):
    # Under vmap each example brings its own mask, which its batch of 2 rows
    # shares: the kernels see 3 list rows for 6 batch rows, each list row
    # serving a run of 2.
    examples = 3
    stacked = [_inputs(f"{self.id()}/{i}", batch=2, seq_q=385, seq_k=640, num_heads=4,
                       num_kv_heads=2, head_dim=64, dtype=jnp.bfloat16)
               for i in range(examples)]
    q, k, v, dout, dlse = (jnp.stack(xs) for xs in zip(*stacked))
    masks = jax_flash.BlockSparseMask.random(jax.random.key(5), 0.4, 385, 640,
                                             shape=(examples,))

    def step(q, k, v, dout, dlse, blocks):
      m = jax_flash.BlockSparseMask(blocks, masks.block_size)
      fn = functools.partial(cuda_attention, block_mask=m, return_lse=True)
      return _value_and_grads(fn, q, k, v, dout, dlse)

    batched = jax.jit(jax.vmap(step))(q, k, v, dout, dlse, masks.blocks)
    for i in range(examples):
      looped = jax.jit(step)(q[i], k[i], v[i], dout[i], dlse[i], masks.blocks[i])
      for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), batched, looped):
        _assert_same_up_to_rounding(self, f"{name}[{i}]", got[i], want)

  def test_deterministic_block_sparse_backward_is_bitwise_repeatable(self):
    q, k, v, dout, dlse = self._inputs(seq_q=1100, seq_k=1100)
    m = jax_flash.BlockSparseMask.butterfly(1100, 1100) | jax_flash.BlockSparseMask.local(
        1100, 1100, 1)
    fn = functools.partial(cuda_attention, deterministic=True, causal=True, block_mask=m,
                           return_lse=True)
    _assert_grads_repeat_bitwise(fn, (q, k, v, dout, dlse), runs=10)


@_needs_cuda
class CudaBehaviourTest(parameterized.TestCase):

  def _inputs(self, *, batch=2, seq_q=333, seq_k=333, heads=8, kv_heads=2,
              head_dim=64, dtype=jnp.bfloat16, draw=0):
    return _inputs(f"{self.id()}/{draw}", batch=batch, seq_q=seq_q,
                   seq_k=seq_k, num_heads=heads, num_kv_heads=kv_heads,
                   head_dim=head_dim, dtype=dtype)

  @parameterized.named_parameters(
      dict(testcase_name="_d64_causal", head_dim=64, causal=True,
           seq_q=1025, seq_k=1025),
      dict(testcase_name="_d96_full_gqa", head_dim=96, causal=False,
           seq_q=203, seq_k=2049),
      dict(testcase_name="_d256_causal_q_gt_k", head_dim=256, causal=True,
           seq_q=777, seq_k=300),
  )
  def test_forward_is_bitwise_repeatable(self, head_dim, causal, seq_q, seq_k):
    q, k, v, _, _ = self._inputs(seq_q=seq_q, seq_k=seq_k, head_dim=head_dim)
    fwd = jax.jit(_flash(causal))
    first_out, first_lse = jax.device_get(fwd(q, k, v))
    for _ in range(4):
      out, lse = jax.device_get(fwd(q, k, v))
      np.testing.assert_array_equal(out.view(np.uint16),
                                    first_out.view(np.uint16))
      np.testing.assert_array_equal(lse.view(np.uint32),
                                    first_lse.view(np.uint32))

  @parameterized.named_parameters(
      dict(testcase_name="_causal", causal=True),
      dict(testcase_name="_full", causal=False),
  )
  def test_jit_matches_eager(self, causal):
    q, k, v, dout, dlse = self._inputs()
    eager = _flash(causal)(q, k, v)
    jitted = jax.jit(_flash(causal))(q, k, v)
    for name, a, b in zip(("out", "lse"), jitted, eager):
      np.testing.assert_array_equal(np.asarray(a, np.float32),
                                    np.asarray(b, np.float32), name)
    grads = jax.jit(lambda *a: _value_and_grads(_flash(causal), *a)[2:])(
        q, k, v, dout, dlse)
    eager_grads = _value_and_grads(_flash(causal), q, k, v, dout, dlse)[2:]
    for name, a, b in zip(("dq", "dk", "dv"), grads, eager_grads):
      _assert_same_up_to_rounding(self, name, a, b)

  @parameterized.named_parameters(
      dict(testcase_name="_causal_gqa", causal=True, kv_heads=2,
           in_axes=(0, 0, 0)),
      dict(testcase_name="_full_mha", causal=False, kv_heads=8,
           in_axes=(0, 0, 0)),
      dict(testcase_name="_shared_kv", causal=True, kv_heads=1,
           in_axes=(0, None, None)),
  )
  def test_vmap_matches_per_example_loop(self, causal, kv_heads, in_axes):
    examples = 3
    stacked = [self._inputs(seq_q=203, seq_k=300, kv_heads=kv_heads, draw=i)
               for i in range(examples)]
    q, k, v, dout, dlse = (jnp.stack(xs) for xs in zip(*stacked))
    if in_axes[1] is None:
      k, v = k[0], v[0]

    def step(q, k, v, dout, dlse):
      return _value_and_grads(_flash(causal), q, k, v, dout, dlse)

    axes = (*in_axes, 0, 0)
    batched = jax.jit(jax.vmap(step, in_axes=axes))(q, k, v, dout, dlse)
    looped = [jax.jit(step)(*(x if a is None else x[i]
                              for x, a in zip((q, k, v, dout, dlse), axes)))
              for i in range(examples)]
    # With shared k and v too, each example's dk and dv come out separately.
    for idx, name in enumerate(("out", "lse", "dq", "dk", "dv")):
      want = np.stack([np.asarray(r[idx], np.float32) for r in looped])
      _assert_same_up_to_rounding(self, name, batched[idx], want)

  @parameterized.named_parameters(
      dict(testcase_name="_causal", causal=True),
      dict(testcase_name="_full", causal=False),
  )
  def test_checkpoint_gives_the_same_grads(self, causal):
    q, k, v, dout, dlse = self._inputs(seq_q=515, seq_k=515)

    def loss(q, k, v):
      out, lse = _flash(causal)(q, k, v)
      return (jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))
              + jnp.sum(lse * dlse))

    plain = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip(("dq", "dk", "dv"), remat, plain):
      _assert_same_up_to_rounding(self, name, a, b)

  def test_default_implementation_is_the_cuda_kernels(self):
    q, k, v, _, _ = self._inputs()
    default = jax.jit(_flash(True, implementation=None))(q, k, v)
    cuda = jax.jit(_flash(True, implementation="cuda"))(q, k, v)
    for name, a, b in zip(("out", "lse"), default, cuda):
      np.testing.assert_array_equal(np.asarray(a, np.float32),
                                    np.asarray(b, np.float32), name)

  @parameterized.named_parameters(
      dict(testcase_name="_d64_causal_gqa", head_dim=64, causal=True, seq_q=1025, seq_k=1537),
      dict(testcase_name="_d128_full", head_dim=128, causal=False, seq_q=777, seq_k=777),
      dict(testcase_name="_d256_causal", head_dim=256, causal=True, seq_q=515, seq_k=300),
  )
  def test_deterministic_backward_is_bitwise_repeatable(self, head_dim, causal, seq_q,
                                                        seq_k):
    q, k, v, dout, dlse = self._inputs(seq_q=seq_q, seq_k=seq_k, head_dim=head_dim)
    fn = functools.partial(cuda_attention, deterministic=True)
    util.assert_matches_reference(fn, q, k, v, dout, dlse, causal=causal)
    _assert_grads_repeat_bitwise(functools.partial(fn, causal=causal, return_lse=True),
                                 (q, k, v, dout, dlse), runs=20)

  @parameterized.parameters(64, 128, 256)
  def test_sm80_kernels_agree_with_the_default_family(self, head_dim):
    """On Hopper the default is the sm90 family; JAX_FLASH_KERNELS=sm80 (read
    once per process, hence the subprocess) runs the sm80 one. Both must agree
    up to rounding, forward and backward, causal with GQA and ragged lengths."""
    here = pathlib.Path(__file__).resolve().parent
    script = f"""
import sys
sys.path.insert(0, {str(here)!r})
import jax, jax.numpy as jnp, numpy as np
import jax_flash, util
q, k, v, dout, dlse = util.random_inputs(7, batch=2, seq_q=517, seq_k=901, num_heads=8,
                                         num_kv_heads=2, head_dim={head_dim},
                                         dtype=jnp.bfloat16)
fn = lambda q, k, v: jax_flash.flash_attention(q, k, v, causal=True, return_lse=True,
                                               implementation="cuda")
(out, lse), vjp = jax.vjp(fn, q, k, v)
results = (out, lse, *vjp((dout, dlse)))
np.savez(sys.argv[1], *[np.asarray(x, np.float32) for x in results])
"""
    with tempfile.TemporaryDirectory() as tmp:
      paths = {}
      for family in ("default", "sm80"):
        env = dict(os.environ)
        env.pop("JAX_FLASH_KERNELS", None)
        if family == "sm80":
          env["JAX_FLASH_KERNELS"] = "sm80"
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        paths[family] = os.path.join(tmp, f"{family}.npz")
        subprocess.run([sys.executable, "-c", script, paths[family]], env=env, check=True,
                       timeout=240)
      default, sm80 = np.load(paths["default"]), np.load(paths["sm80"])
      for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        _assert_same_up_to_rounding(self, name, default[f"arr_{i}"], sm80[f"arr_{i}"])

  def test_cuda_rejects_float32_inputs(self):
    q, k, v, _, _ = self._inputs(dtype=jnp.float32)
    with self.assertRaises((ValueError, TypeError)):
      jax_flash.flash_attention(q, k, v, implementation="cuda")


if __name__ == "__main__":
  absltest.main()
