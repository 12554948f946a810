"""Runs one forward and one backward of jax_flash, for a profiler to capture.

  ncu -k regex:flash_ -c 4 --section SpeedOfLight --section WarpStateStats \
      python benchmarks/profile_kernels.py --seq 4096 --head-dim 128

The shape follows the benchmark sweep (16k tokens, hidden 2048, bf16).
"""

import argparse

import jax
import jax.numpy as jnp

import jax_flash


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--causal", action="store_true")
  args = parser.parse_args()
  batch, heads = 16384 // args.seq, 2048 // args.head_dim
  shape = (batch, args.seq, heads, args.head_dim)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, dout = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)

  @jax.jit
  def step(q, k, v, dout):
    out, pullback = jax.vjp(
        lambda q, k, v: jax_flash.flash_attention(q, k, v, causal=args.causal,
                                                  implementation="cuda"), q, k, v)
    return out, pullback(dout)

  jax.block_until_ready(step(q, k, v, dout))


if __name__ == "__main__":
  main()
