"""jax_flash at work: exact attention whose memory grows linearly with length.

Runs on whatever JAX finds (CUDA kernels on a GPU, the portable path on CPU):

1. checks jax_flash against the plain-softmax reference (output and gradients);
2. for growing sequence lengths, times a jitted forward+backward step of
   jax_flash and of XLA attention (`jax.nn.dot_product_attention`), and shows
   the temp memory each compiled step needs.

  python examples/demo.py
"""

import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import jax_flash  # noqa: E402
from jax_flash import _cuda  # noqa: E402

ON_GPU = jax.devices()[0].platform == "gpu"
# GPU: a bf16 model-sized layer. CPU: small enough for two cores in ~a minute.
DTYPE = jnp.bfloat16 if ON_GPU else jnp.float32
BATCH, HEADS, KV_HEADS, HEAD_DIM = (2, 16, 16, 128) if ON_GPU else (1, 4, 4, 64)
SEQS = ((1024, 2048, 4096, 8192, 16384, 32768) if ON_GPU else
        (256, 512, 1024, 2048, 4096, 8192, 16384))
# Lengths whose timing would end past this show compiled memory only.
TIME_BUDGET_S = 45


def normal(key, shape, dtype=DTYPE):
  return jax.random.normal(key, shape, dtype)


def inputs(seq, seed=0, *, heads=HEADS, kv_heads=KV_HEADS):
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  return (normal(kq, (BATCH, seq, heads, HEAD_DIM)),
          normal(kk, (BATCH, seq, kv_heads, HEAD_DIM)),
          normal(kv, (BATCH, seq, kv_heads, HEAD_DIM)),
          normal(kd, (BATCH, seq, heads, HEAD_DIM)))


def flash(q, k, v):
  return jax_flash.flash_attention(q, k, v, causal=True)


def xla(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                      implementation="xla")


def train_step(attn):
  """Forward and the gradients for a random output cotangent."""
  def step(q, k, v, dout):
    out, pullback = jax.vjp(attn, q, k, v)
    return (out, *pullback(dout))
  return step


def check_against_reference():
  q, k, v, dout = inputs(333, seed=1, heads=8, kv_heads=2)  # GQA, odd length

  def reference(q, k, v):
    return jax_flash.attention_reference(q, k, v, causal=True,
                                         compute_dtype=jnp.float32)

  got = jax.jit(train_step(flash))(q, k, v, dout)
  want = jax.jit(train_step(reference))(
      *(x.astype(jnp.float32) for x in (q, k, v, dout)))
  errors = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)))
            for g, w in zip(got, want)]
  print("max |jax_flash - fp32 reference| (causal, seq 333, 8 heads over 2 kv "
        "heads):")
  print("  " + ", ".join(f"{n} {e:.2e}" for n, e in
                         zip(("out", "dq", "dk", "dv"), errors)))


def compile_step(attn, args):
  """The compiled step and its temp bytes, or (None, error text)."""
  try:
    compiled = jax.jit(train_step(attn)).lower(*args).compile()
  except Exception as e:  # noqa: BLE001 - reported in the table
    return None, _error_label(e)
  stats = compiled.memory_analysis()
  return compiled, (stats.temp_size_in_bytes if stats is not None else None)


def median_seconds(compiled, args, repeats=3):
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def time_or_error(compiled, args):
  try:
    return median_seconds(compiled, args), ""
  except Exception as e:  # noqa: BLE001 - reported in the table
    return None, _error_label(e)


def _error_label(e: Exception) -> str:
  return "OOM" if "RESOURCE_EXHAUSTED" in str(e) else type(e).__name__


def fmt_ms(seconds, note):
  if seconds is None:
    return f"{note or '-':>10}"
  return f"{seconds * 1e3:10.1f}"


def fmt_mib(nbytes):
  return f"{nbytes / 2**20:10.1f}" if isinstance(nbytes, int) else f"{'-':>10}"


def compare_with_xla():
  print(f"\ncausal forward+backward, batch {BATCH}, {HEADS} heads, head_dim "
        f"{HEAD_DIM}, {jnp.dtype(DTYPE).name}; ms = median of 3 runs, "
        "MiB = compiled temp memory")
  print(f"{'seq':>6} | {'flash ms':>10} {'xla ms':>10} {'speedup':>8} | "
        f"{'flash MiB':>10} {'xla MiB':>10} {'xla/flash':>9}")
  started = time.perf_counter()
  last_cost = 0.0
  skipped = False
  for seq in SEQS:
    args = inputs(seq)
    row_started = time.perf_counter()
    # Attention's cost grows with the square of the length.
    timing = row_started - started + 4 * last_cost < TIME_BUDGET_S
    skipped |= not timing
    row = []
    for attn in (flash, xla):
      compiled, temp = compile_step(attn, args)
      if compiled is None:
        row.append((None, temp, None))
      elif timing:
        row.append((*time_or_error(compiled, args), temp))
      else:
        row.append((None, "", temp))
    if timing:
      last_cost = time.perf_counter() - row_started
    (t_f, note_f, m_f), (t_x, note_x, m_x) = row
    speedup = f"{t_x / t_f:7.2f}x" if t_f and t_x else f"{'-':>8}"
    mem_ratio = (f"{m_x / m_f:8.1f}x" if isinstance(m_f, int) and m_f
                 and isinstance(m_x, int) else f"{'-':>9}")
    print(f"{seq:>6} | {fmt_ms(t_f, note_f)} {fmt_ms(t_x, note_x)} {speedup} | "
          f"{fmt_mib(m_f)} {fmt_mib(m_x)} {mem_ratio}", flush=True)
  if skipped:
    print(f"(lengths whose timing would take past {TIME_BUDGET_S} s show "
          "compiled memory only)")


def main():
  device = jax.devices()[0]
  if _cuda.available():
    path = "CUDA kernels"
  elif ON_GPU:
    path = f"portable path: {_cuda.unavailable_reason()}"
  else:
    path = "portable path"
  print(f"jax {jax.__version__} on {device.device_kind}; jax_flash uses its "
        f"{path}")
  check_against_reference()
  compare_with_xla()


if __name__ == "__main__":
  main()
