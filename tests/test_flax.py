"""The Flax adapters against Flax's own attention layers (same parameters).

float32 on the portable path, so both sides compute the same exact attention and
agree to float32 rounding.
"""

from __future__ import annotations

import functools
from unittest import mock

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

flax = __import__("pytest").importorskip("flax")
from flax import nnx  # noqa: E402
import flax.linen as nn  # noqa: E402

import jax_flash.flax as jf  # noqa: E402
from jax_flash.flax import _core  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)
BATCH, LENGTH, FEATURES, HEADS = 2, 24, 32, 4


def _x(seed, shape=(BATCH, LENGTH, FEATURES)):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _close(test, got, want):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL),
               got, want)


def _causal_window_mask(length, left):
  i = jnp.arange(length)[:, None]
  j = jnp.arange(length)[None, :]
  return ((j <= i) & (j >= i - left))[None, None]


class LinenAttentionFnTest(parameterized.TestCase):

  def _layers(self, **kw):
    ref = nn.MultiHeadDotProductAttention(num_heads=HEADS, **kw)
    ours = nn.MultiHeadDotProductAttention(num_heads=HEADS, attention_fn=jf.attention_fn, **kw)
    return ref, ours

  def _check(self, ref, ours, x, ref_kwargs, our_kwargs, params=None):
    params = params or ref.init(jax.random.key(1), x, **ref_kwargs)

    def loss(layer, kwargs, p, x):
      return jnp.sum(jnp.sin(layer.apply(p, x, **kwargs)))

    _close(self, ours.apply(params, x, **our_kwargs), ref.apply(params, x, **ref_kwargs))
    _close(self, jax.grad(loss, argnums=(2, 3))(ours, our_kwargs, params, x),
           jax.grad(loss, argnums=(2, 3))(ref, ref_kwargs, params, x))

  def test_no_mask_runs_flash_attention(self):
    ref, ours = self._layers()
    with mock.patch.object(_core, "flash", wraps=_core.flash) as flash:
      self._check(ref, ours, _x(0), {}, {})
    self.assertTrue(flash.called)

  @parameterized.named_parameters(
      ("causal_mask", lambda: nn.make_causal_mask(jnp.ones((BATCH, LENGTH)))),
      ("padding_mask", lambda: nn.make_attention_mask(
          jnp.arange(LENGTH)[None] < jnp.array([[LENGTH], [LENGTH - 7]]),
          jnp.arange(LENGTH)[None] < jnp.array([[LENGTH], [LENGTH - 7]]))),
  )
  def test_masks_match_flax(self, make_mask):
    ref, ours = self._layers()
    mask = make_mask()
    self._check(ref, ours, _x(1), dict(mask=mask), dict(mask=mask))

  def test_causal_argument_equals_flax_with_a_causal_mask(self):
    ref = nn.MultiHeadDotProductAttention(num_heads=HEADS)
    ours = nn.MultiHeadDotProductAttention(
        num_heads=HEADS, attention_fn=functools.partial(jf.attention_fn, causal=True))
    mask = nn.make_causal_mask(jnp.ones((BATCH, LENGTH)))
    self._check(ref, ours, _x(2), dict(mask=mask), {})

  def test_cross_attention_with_other_lengths(self):
    ref, ours = self._layers()
    q, kv = _x(3), _x(4, (BATCH, 9, FEATURES))
    params = ref.init(jax.random.key(1), q, kv)
    _close(self, ours.apply(params, q, kv), ref.apply(params, q, kv))

  def test_causal_rows_without_keys_equal_flax_with_the_mask_on_both_paths(self):
    """More queries than keys: causal (bottom-right) hides every key from the
    first rows, which Flax's masked softmax makes the mean of V."""
    q, k, v = (jax.random.normal(jax.random.key(s), (BATCH, n, HEADS, 8), jnp.float32)
               for s, n in ((30, 12), (31, 5), (32, 5)))
    mask = (jnp.arange(5)[None, :] <= jnp.arange(12)[:, None] + 5 - 12)[None, None]
    want = nn.dot_product_attention(q, k, v, mask=mask)
    with mock.patch.object(_core, "flash", wraps=_core.flash) as flash:
      _close(self, jf.attention_fn(q, k, v, causal=True), want)
    self.assertTrue(flash.called)
    _close(self, jf.attention_fn(q, k, v, causal=True, mask=jnp.ones((12, 5), bool)), want)
    grad = lambda f: jax.grad(lambda v: jnp.sum(jnp.sin(f(v))))(v)
    _close(self, grad(lambda v: jf.attention_fn(q, k, v, causal=True)),
           grad(lambda v: nn.dot_product_attention(q, k, v, mask=mask)))

  def test_force_fp32_for_softmax_gives_flax_float32_on_the_kernels(self):
    q, k, v = (jax.random.normal(jax.random.key(s), (BATCH, 16, HEADS, 8), jnp.bfloat16)
               for s in (33, 34, 35))
    want = nn.dot_product_attention(q, k, v, force_fp32_for_softmax=True)
    got = jf.attention_fn(q, k, v, force_fp32_for_softmax=True)
    self.assertEqual(got.dtype, want.dtype)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2, rtol=2e-2)
    self.assertEqual(jf.attention_fn(q, k, v).dtype, jnp.bfloat16)

  def test_extra_batch_dims_and_none(self):
    ref, ours = self._layers()
    for x in (_x(5, (2, 3, LENGTH, FEATURES)), _x(6, (LENGTH, FEATURES))):
      params = ref.init(jax.random.key(1), x)
      _close(self, ours.apply(params, x), ref.apply(params, x))

  def test_active_dropout_matches_flax_dropout(self):
    ref, ours = self._layers(dropout_rate=0.3)
    x = _x(7)
    params = ref.init(jax.random.key(1), x, deterministic=True)
    rngs = {"dropout": jax.random.key(9)}
    got = ours.apply(params, x, deterministic=False, rngs=rngs)
    _close(self, got, ref.apply(params, x, deterministic=False, rngs=rngs))
    self.assertGreater(float(jnp.abs(got - ours.apply(params, x, deterministic=True)).max()),
                       1e-3)

  def test_sown_weights_come_from_the_fallback(self):
    _, ours = self._layers()
    x = _x(8)
    params = ours.init(jax.random.key(1), x)
    _, state = ours.apply(params, x, sow_weights=True, mutable=["intermediates"])
    weights = jax.tree.leaves(state["intermediates"])[0]
    self.assertEqual(weights.shape, (BATCH, HEADS, LENGTH, LENGTH))
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, atol=1e-5)

  def test_fallback_can_be_refused(self):
    ours = nn.MultiHeadDotProductAttention(
        num_heads=HEADS, attention_fn=functools.partial(jf.attention_fn, allow_fallback=False))
    x = _x(9)
    params = ours.init(jax.random.key(1), x)
    with self.assertRaisesRegex(ValueError, r"a mask.*allow_fallback=False"):
      ours.apply(params, x, mask=nn.make_causal_mask(jnp.ones((BATCH, LENGTH))))


class LinenModuleTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("default", {}),
      ("features_and_qk_norm", dict(qkv_features=48, out_features=20, normalize_qk=True)),
      ("no_bias", dict(use_bias=False)),
  )
  def test_parameter_tree_and_checkpoints_load_both_ways(self, kw):
    ref = nn.MultiHeadDotProductAttention(num_heads=HEADS, **kw)
    ours = jf.FlashMultiHeadAttention(num_heads=HEADS, **kw)
    x = _x(10)
    p_ref, p_ours = ref.init(jax.random.key(1), x), ours.init(jax.random.key(1), x)
    self.assertEqual(jax.tree.structure(p_ref), jax.tree.structure(p_ours))
    self.assertEqual(jax.tree.map(jnp.shape, p_ref), jax.tree.map(jnp.shape, p_ours))
    _close(self, p_ours, p_ref)  # same initializers, same names: same values
    for params in (p_ref, p_ours):
      _close(self, ours.apply(params, x), ref.apply(params, x))

  def test_causal_window_equals_flax_with_that_mask(self):
    ref = nn.MultiHeadDotProductAttention(num_heads=HEADS)
    x = _x(11)
    params = ref.init(jax.random.key(1), x)
    for window, mask in (((None, 0), _causal_window_mask(LENGTH, LENGTH)),
                         ((5, 0), _causal_window_mask(LENGTH, 5)),
                         ((5, 3), _causal_window_mask(LENGTH, 5))):
      # No fallback: flash_attention takes the window itself.
      ours = jf.FlashMultiHeadAttention(num_heads=HEADS, causal=True, window_size=window,
                                        allow_fallback=False)
      _close(self, ours.apply(params, x), ref.apply(params, x, mask=mask))

  def test_gqa_equals_flax_attention_on_repeated_kv_heads(self):
    ours = jf.FlashMultiHeadAttention(num_heads=HEADS, num_kv_heads=2, causal=True)
    x = _x(12)
    params = ours.init(jax.random.key(1), x)
    self.assertEqual(params["params"]["key"]["kernel"].shape, (FEATURES, 2, FEATURES // HEADS))
    dense = lambda name, heads: nn.DenseGeneral((heads, FEATURES // HEADS)).apply(
        {"params": params["params"][name]}, x)
    q, k, v = dense("query", HEADS), dense("key", 2), dense("value", 2)
    k, v = jnp.repeat(k, 2, axis=-2), jnp.repeat(v, 2, axis=-2)
    attn = nn.dot_product_attention(q, k, v, mask=nn.make_causal_mask(jnp.ones((BATCH, LENGTH))))
    want = nn.DenseGeneral(FEATURES, axis=(-2, -1)).apply({"params": params["params"]["out"]},
                                                         attn)
    _close(self, ours.apply(params, x), want)

  def test_rotary_queries_and_keys_then_attention(self):
    ours = jf.FlashMultiHeadAttention(num_heads=HEADS, causal=True, rotary=True)
    x = _x(13)
    params = ours.init(jax.random.key(1), x)
    dense = lambda name: nn.DenseGeneral((HEADS, FEATURES // HEADS)).apply(
        {"params": params["params"][name]}, x)
    pos = jnp.arange(LENGTH)
    q = jf.rotary_embedding(dense("query"), pos)
    k = jf.rotary_embedding(dense("key"), pos)
    attn = nn.dot_product_attention(q, k, dense("value"),
                                    mask=nn.make_causal_mask(jnp.ones((BATCH, LENGTH))))
    want = nn.DenseGeneral(FEATURES, axis=(-2, -1)).apply({"params": params["params"]["out"]},
                                                         attn)
    _close(self, ours.apply(params, x), want)

  @parameterized.named_parameters(("plain", False), ("rotary", True))
  def test_decoding_token_by_token_equals_the_causal_sequence(self, rotary):
    full = jf.FlashMultiHeadAttention(num_heads=HEADS, num_kv_heads=2, causal=True,
                                      rotary=rotary)
    step = full.clone(decode=True)
    x = _x(14)
    params = full.init(jax.random.key(1), x)
    want = full.apply(params, x)
    cache = step.init(jax.random.key(1), x)["cache"]
    got = []
    for t in range(LENGTH):
      y, mutated = step.apply({**params, "cache": cache}, x[:, t:t + 1], mutable=["cache"])
      cache = mutated["cache"]
      got.append(y)
    _close(self, jnp.concatenate(got, axis=1), want)


class RotaryEmbeddingTest(absltest.TestCase):

  def test_scores_depend_only_on_the_relative_position(self):
    q = _x(15, (1, 1, 1, 64))
    k = _x(16, (1, 1, 1, 64))
    score = lambda m, n: jnp.sum(jf.rotary_embedding(q, jnp.array([m]))
                                 * jf.rotary_embedding(k, jnp.array([n])))
    np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)
    np.testing.assert_allclose(score(0, 0), jnp.sum(q * k), rtol=1e-5)
    self.assertGreater(abs(float(score(7, 3) - score(3, 7))), 1e-3)

  def test_odd_head_dim_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "even head_dim"):
      jf.rotary_embedding(_x(17, (1, 4, 1, 5)), jnp.arange(4))


class NnxTest(parameterized.TestCase):

  def _pair(self, num_kv_heads=None, **kw):
    make = lambda cls, **extra: cls(num_heads=HEADS, in_features=FEATURES,
                                    num_kv_heads=num_kv_heads, decode=False,
                                    rngs=nnx.Rngs(0), **kw, **extra)
    return make(nnx.MultiHeadAttention), make(nnx.MultiHeadAttention,
                                              attention_fn=jf.nnx.attention_fn)

  @parameterized.named_parameters(
      ("mha", None, {}), ("mha_is_causal", None, dict(is_causal=True)),
      ("gqa_is_causal", 2, dict(is_causal=True)),
      ("mask", None, dict(mask=nn.make_causal_mask(jnp.ones((BATCH, LENGTH))))),
  )
  def test_attention_fn_matches_nnx(self, num_kv_heads, call_kw):
    ref, ours = self._pair(num_kv_heads)
    x = _x(18)
    with mock.patch.object(_core, "flash", wraps=_core.flash) as flash:
      _close(self, ours(x, **call_kw), ref(x, **call_kw))
    self.assertEqual(flash.called, "mask" not in call_kw)

    def loss(model, x):
      return jnp.sum(jnp.sin(model(x, **call_kw)))

    _close(self, nnx.grad(loss, argnums=(0, 1))(ours, x), nnx.grad(loss, argnums=(0, 1))(ref, x))

  def test_is_causal_cross_attention_keeps_nnx_alignment(self):
    ref, ours = self._pair()
    q, kv = _x(19), _x(20, (BATCH, 9, FEATURES))
    _close(self, ours(q, kv, is_causal=True), ref(q, kv, is_causal=True))

  def test_module_has_nnx_parameters_and_results(self):
    ref = nnx.MultiHeadAttention(num_heads=HEADS, in_features=FEATURES, num_kv_heads=2,
                                 decode=False, rngs=nnx.Rngs(0))
    ours = jf.nnx.FlashMultiHeadAttention(num_heads=HEADS, in_features=FEATURES,
                                          num_kv_heads=2, decode=False, rngs=nnx.Rngs(0),
                                          causal=True)
    ref_params, our_params = nnx.state(ref, nnx.Param), nnx.state(ours, nnx.Param)
    self.assertEqual(jax.tree.structure(ref_params), jax.tree.structure(our_params))
    _close(self, our_params, ref_params)
    x = _x(21)
    _close(self, ours(x), ref(x, is_causal=True))

  def test_module_refuses_another_attention_fn(self):
    with self.assertRaisesRegex(ValueError, "no other attention_fn"):
      jf.nnx.FlashMultiHeadAttention(num_heads=HEADS, in_features=FEATURES, decode=False,
                                     rngs=nnx.Rngs(0), attention_fn=nnx.dot_product_attention)

  def test_module_decodes_token_by_token(self):
    layer = jf.nnx.FlashMultiHeadAttention(num_heads=HEADS, in_features=FEATURES,
                                           num_kv_heads=2, rngs=nnx.Rngs(0), causal=True,
                                           rotary=True, decode=False)
    x = _x(22)
    want = layer(x)
    layer.init_cache((BATCH, LENGTH, FEATURES), dtype=jnp.float32)
    got = jnp.concatenate([layer(x[:, t:t + 1], decode=True) for t in range(LENGTH)], axis=1)
    _close(self, got, want)


if __name__ == "__main__":
  absltest.main()
