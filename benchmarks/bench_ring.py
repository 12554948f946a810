"""Ring attention scaling: time and memory per device against sequence length
and device count, on whatever devices this process sees.

For each device count n (powers of two up to the devices present) and each
sequence length, one causal forward+backward of `jax_flash.ring_attention`
(zig-zag layout) over an n-device mesh axis, in both modes ("ring" and
"allgather"), and the same attention on one device where it fits. Reports the
median step time and the compiled temporary memory per device
(`memory_analysis()`); per-device memory that stays flat as n grows with the
sequence is what lets sequences outgrow one GPU.

  python benchmarks/bench_ring.py --out-dir benchmarks/results
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
      python benchmarks/bench_ring.py --allow-cpu --quick    # smoke test on CPU
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jax_flash  # noqa: E402
from bench_attention import (  # noqa: E402
    Timing, _error_text, add_run_arguments, start_run, time_call)


def step(n: int, mode: str | None):
  """Causal forward+backward over n devices (mode None: one device, plain
  flash_attention)."""
  if mode is None:
    attend = functools.partial(jax_flash.flash_attention, causal=True)
  else:
    mesh = jax.make_mesh((n,), ("sp",), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,))
    attend = jax.shard_map(
        functools.partial(jax_flash.ring_attention, axis_name="sp", causal=True,
                          layout="zigzag", mode=mode),
        mesh=mesh, in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))

  def fwdbwd(q, k, v, dout):
    out, pullback = jax.vjp(attend, q, k, v)
    return pullback(dout)
  return fwdbwd


def measure(n: int, mode: str | None, seq: int, args, timing: Timing) -> dict:
  row = dict(devices=n, mode=mode or "one device", seq=seq, batch=args.batch,
             heads=args.heads, head_dim=args.head_dim)
  shape = (args.batch, seq, args.heads, args.head_dim)
  try:
    specs = [jax.ShapeDtypeStruct(shape, jnp.bfloat16)] * 4
    if mode is not None:
      mesh = jax.make_mesh((n,), ("sp",), devices=jax.devices()[:n],
                           axis_types=(jax.sharding.AxisType.Auto,))
      sharding = jax.NamedSharding(mesh, P(None, "sp"))
      specs = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)] * 4
    compiled = jax.jit(step(n, mode)).lower(*specs).compile()
    stats = compiled.memory_analysis()
    row["temp_bytes_per_device"] = int(stats.temp_size_in_bytes)
    row["arg_bytes_per_device"] = int(stats.argument_size_in_bytes)
    keys = jax.random.split(jax.random.key(seq), 4)
    arrays = [jax.device_put(jax.random.normal(key, shape, jnp.bfloat16),
                             s.sharding if s.sharding is not None else jax.devices()[0])
              for key, s in zip(keys, specs)]
    row["ms"] = time_call(compiled, arrays, timing) * 1e3
  except Exception as e:  # noqa: BLE001 - every failure is a result to record
    row["error"] = _error_text(e)
  return row


def markdown(rows, command: str, seconds: float) -> str:
  device = jax.devices()[0].device_kind
  out = [f"# Ring attention scaling: {len(jax.devices())} x {device}, "
         f"{time.strftime('%Y-%m-%d')}", "", f"Command: `{command}`  ",
         f"jax {jax.__version__}, bf16, causal forward+backward, zig-zag layout; ms = "
         "median step time; MiB = compiled temporary memory per device. "
         f"Took {seconds:.0f} s.", "",
         "| devices | mode | seq | ms | MiB per device |", "|---|---|---|---|---|"]
  for r in rows:
    ms = f"{r['ms']:.2f}" if "ms" in r else ("OOM" if "RESOURCE" in r.get("error", "")
                                             else "err")
    mib = (f"{r['temp_bytes_per_device'] / 2**20:.1f}" if "temp_bytes_per_device" in r
           else "-")
    out.append(f"| {r['devices']} | {r['mode']} | {r['seq']} | {ms} | {mib} |")
  return "\n".join(out) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")],
                 default=[16384, 65536, 262144])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head-dim", type=int, default=128)
  add_run_arguments(p)
  args = p.parse_args(argv)
  timing, run_log = start_run(args, "ring")
  if args.quick:
    args.seqs, args.heads, args.head_dim = [64, 128], 2, 16
  counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= len(jax.devices())]
  for seq in args.seqs:
    plan = [(1, None)] + [(n, mode) for n in counts for mode in ("ring", "allgather")
                          if seq % (2 * n) == 0]
    for n, mode in plan:
      run_log.record(measure(n, mode, seq, args, timing))
  run_log.finish(markdown, "bench_ring.py", argv)


if __name__ == "__main__":
  main()
