"""Ring attention scaling: time and memory per device against sequence length
and device count, on whatever devices this process sees.

For each device count n (powers of two up to the devices present) and each
sequence length, causal attention over an n-device mesh axis with
`jax_flash.ring_attention` (zig-zag layout) in both modes ("ring" and
"allgather"), and plain `flash_attention` on one device: the median time of the
forward and of forward+backward, and the memory per device of the compiled
forward+backward (`memory_analysis()`: arguments, outputs and temporaries).

For the ring mode it also times the same forward+backward with the transfers
left out (each device attends its own K/V slice in place of the one that would
have arrived) and with the attention left out (only the transfers), and reports
the share of the transfers' time that the attention hides:
(attention only + transfers only - ring) / transfers only.

It also reads the compiled ring program's schedule: of its transfers
(collective-permute start/done pairs), how many have attention work (kernel
calls or the branches that hold them) scheduled between their start and done;
and, from a trace of two forward+backward steps on a GPU, the share of the
transfer kernels' time on the first device during which a jax_flash kernel runs
there too (`kernel_times.transfers_beside_attention`).

`--longest` then finds, for each device count, the longest sequence whose
forward+backward fits in device memory by the compiled program's memory
analysis: it doubles the length while it fits and bisects between the last fit
and the first miss to a multiple of 2n x 1024. At that length one step takes
minutes (time grows with the square of the length), so it is compiled, not run;
`--longest-run` runs it once (stepping down while it runs out of memory; it
needs JAX's preallocated memory pool). `--devices` picks the device counts.

  python benchmarks/bench_ring.py --out-dir benchmarks/results --longest
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
      python benchmarks/bench_ring.py --allow-cpu --quick    # smoke test on CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jax_flash  # noqa: E402
import kernel_times  # noqa: E402
from jax_flash import attention, ring  # noqa: E402
from bench_attention import (  # noqa: E402
    Timing, _device_memory_bytes, _error_text, add_run_arguments, start_run,
    time_calls)


def _ring_call(q, k, v, *, mode: str, ablate: str | None):
  """ring_attention, causal, zig-zag; with `ablate`, its timing variant that
  leaves out the transfers or the attention (results wrong)."""
  if ablate is None:
    return jax_flash.ring_attention(q, k, v, axis_name="sp", causal=True,
                                    layout="zigzag", mode=mode)
  (q, k, v), extras, plan = attention.make_plan(q, k, v, causal=True)
  config = ring.Ring.make(plan, q, k, axis_name="sp", size=lax.axis_size("sp"),
                          layout="zigzag", mode=mode, num_heads=q.shape[2])
  return ring._ring(q, k, v, extras, dataclasses.replace(config, ablate=ablate))[0]


def programs(n: int, mode: str | None, ablate: str | None = None):
  """(forward, forward+backward) of causal attention over n devices (mode
  None: one device, plain flash_attention), and the arrays' sharding."""
  if mode is None:
    attend, sharding = functools.partial(jax_flash.flash_attention, causal=True), None
  else:
    mesh = jax.make_mesh((n,), ("sp",), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.NamedSharding(mesh, P(None, "sp"))
    attend = jax.shard_map(functools.partial(_ring_call, mode=mode, ablate=ablate),
                           mesh=mesh, in_specs=(P(None, "sp"),) * 3,
                           out_specs=P(None, "sp"))

  def forward(q, k, v, dout):
    del dout
    return attend(q, k, v)

  def forward_backward(q, k, v, dout):
    _, pullback = jax.vjp(attend, q, k, v)
    return pullback(dout)

  return forward, forward_backward, sharding


def _specs(shape, sharding):
  return [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)] * 4


def _bytes_per_device(compiled) -> int:
  stats = compiled.memory_analysis()
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def transfer_overlap(hlo_text: str) -> tuple[int, int]:
  """(transfers with attention work scheduled between their start and done,
  transfers) in a compiled program's text, whose instructions are listed in
  schedule order."""
  open_transfers, overlapped, total = {}, 0, 0
  for line in hlo_text.splitlines():
    if "collective-permute-start(" in line:
      open_transfers[line.split("=")[0].strip().removeprefix("ROOT ").lstrip("%")] = False
    elif "collective-permute-done(" in line:
      start = re.search(r"collective-permute-done\([^%]*%([\w.-]+)", line)
      if start and start.group(1) in open_transfers:
        total += 1
        overlapped += open_transfers.pop(start.group(1))
    elif " conditional(" in line or ("custom-call(" in line and "jax_flash" in line):
      open_transfers = dict.fromkeys(open_transfers, True)
  return overlapped, total


def _arrays(shape, sharding, seed: int):
  """Four bf16 arrays of `shape` with values in [-1, 1], each made by one fused
  program on its devices: no temporaries the size of the array (as
  jax.random's would be), which would fragment the memory that the longest
  runs need in one piece."""
  def make(salt):
    position = [lax.broadcasted_iota(jnp.float32, shape, d) for d in range(len(shape))]
    phase = sum(x * f for x, f in zip(position, (0.61803, 0.01379, 1.73205, 0.31416)))
    return jnp.sin(phase + float(seed * 4 + salt)).astype(jnp.bfloat16)
  place = sharding if sharding is not None else jax.sharding.SingleDeviceSharding(
      jax.devices()[0])
  return [jax.jit(make, static_argnums=0, out_shardings=place)(salt) for salt in range(4)]


def measure(n: int, mode: str | None, seq: int, args, timing: Timing) -> dict:
  row = dict(devices=n, mode=mode or "one device", seq=seq, batch=args.batch,
             heads=args.heads, head_dim=args.head_dim)
  shape = (args.batch, seq, args.heads, args.head_dim)
  try:
    forward, forward_backward, sharding = programs(n, mode)
    specs = _specs(shape, sharding)
    fns = [jax.jit(forward).lower(*specs).compile(),
           jax.jit(forward_backward).lower(*specs).compile()]
    row["bytes_per_device"] = _bytes_per_device(fns[1])
    names = ["fwd_ms", "fwdbwd_ms"]
    if mode == "ring" and n > 1:
      overlapped, total = transfer_overlap(fns[1].as_text())
      row["transfers_overlapped"] = f"{overlapped}/{total}"
      for ablate in ("transfers", "attention"):
        fns.append(jax.jit(programs(n, mode, ablate)[1]).lower(*specs).compile())
        names.append(f"fwdbwd_without_{ablate}_ms")
    arrays = _arrays(shape, sharding, seq)
    seconds = time_calls(fns, arrays, timing)
    row.update({name: s * 1e3 for name, s in zip(names, seconds)})
    if mode == "ring" and n > 1:
      profile = kernel_times.trace_profile(fns[1], arrays, steps=2)
      beside = profile and kernel_times.transfers_beside_attention(profile, steps=2)
      if beside:
        row["transfer_kernel_ms"], row["transfers_beside_attention"] = beside[0] / 1e3, beside[1]
    if "fwdbwd_without_attention_ms" in row:
      transfers = row["fwdbwd_without_attention_ms"]
      row["hidden"] = (row["fwdbwd_without_transfers_ms"] + transfers
                       - row["fwdbwd_ms"]) / transfers
  except Exception as e:  # noqa: BLE001 - every failure is a result to record
    row["error"] = _error_text(e)
  return row


def _out_of_memory(error: str) -> bool:
  return "RESOURCE_EXHAUSTED" in error or "out of memory" in error.lower()


def _run_once(compiled, arrays) -> float:
  """Seconds of one call: at the longest lengths a step takes minutes, so the
  one call is the figure, not a median."""
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(*arrays))
  return time.perf_counter() - t0


def longest(n: int, args) -> dict:
  """The longest sequence whose forward+backward fits on n devices (ring mode
  from 2 devices, plain flash_attention on one) by the compiled program's memory
  analysis; with --longest-run, the longest that runs: from that length down
  in steps of ~4% while a step runs out of memory. With JAX's default
  preallocation (one pool of the whole limit) the analysis is what a step
  takes; a growing pool (XLA_PYTHON_CLIENT_PREALLOCATE=false) splits into
  regions that cannot hold a step's temporaries in one piece, so main refuses
  --longest-run there."""
  mode = "ring" if n > 1 else None
  unit = 2 * n * 1024
  limit = _device_memory_bytes()
  row = dict(devices=n, mode=(mode or "one device") + ", longest", batch=args.batch,
             heads=args.heads, head_dim=args.head_dim, memory_limit_bytes=limit)
  if limit is None:
    row["error"] = "the devices report no memory limit"
    return row
  _, forward_backward, sharding = programs(n, mode)
  def shape_of(units: int):
    return (args.batch, units * unit, args.heads, args.head_dim)

  @functools.cache  # the search compiles the length it settles on already
  def compile_at(units: int):
    return jax.jit(forward_backward).lower(*_specs(shape_of(units), sharding)).compile()

  misses = {}  # units -> why it does not fit

  def fits(units: int) -> bool:
    try:
      compiled = compile_at(units)
    except Exception as e:  # noqa: BLE001 - a program that does not compile does not fit
      misses[units] = _error_text(e)
      return False
    used = _bytes_per_device(compiled)
    if used > limit:
      misses[units] = f"{used / 2**30:.2f} GiB per device"
    return used <= limit

  fit, miss = 0, max(1, (args.seqs or [16384])[0] // unit)
  while fits(miss):
    fit, miss = miss, miss * 2
  while miss - fit > max(1, fit // 64):  # within 1.6%
    middle = (fit + miss) // 2
    fit, miss = (middle, miss) if fits(middle) else (fit, middle)
  row["seq"] = fit * unit
  row["first_miss"] = f"{miss * unit}: {misses.get(miss, '?')}"
  if not fit:
    row["error"] = "the shortest length tried does not fit"
    return row
  try:
    compiled = compile_at(fit)
    row["bytes_per_device"] = _bytes_per_device(compiled)
    if not args.longest_run:
      return row
    row["seq_by_analysis"] = row["seq"]
    for _ in range(8):
      arrays = _arrays(shape_of(fit), sharding, 0)
      try:
        row["fwdbwd_ms"] = _run_once(compiled, arrays) * 1e3
        row.pop("error", None)
        break
      except Exception as e:  # noqa: BLE001
        row["error"] = _error_text(e)
        if not _out_of_memory(row["error"]):
          break
      finally:
        for a in arrays:
          a.delete()
      fit = fit * 24 // 25
      compiled = compile_at(fit)
      row.update(seq=fit * unit, bytes_per_device=_bytes_per_device(compiled))
  except Exception as e:  # noqa: BLE001
    row["error"] = _error_text(e)
  return row


def markdown(rows, command: str, seconds: float) -> str:
  device = jax.devices()[0].device_kind
  out = [f"# Ring attention scaling: {len(jax.devices())} x {device}, "
         f"{time.strftime('%Y-%m-%d')}", "", f"Command: `{command}`  ",
         f"jax {jax.__version__}, bf16, causal, zig-zag layout. fwd and fwd+bwd: median "
         "ms. GiB: memory per device of the compiled forward+backward (arguments, outputs, "
         "temporaries). hidden: share of the transfers' time hidden behind the attention, "
         "(attention only + transfers only - ring) / transfers only, from the two "
         "fwd+bwd columns beside it; overlapped: transfers with attention scheduled between "
         "their start and done in the compiled program; beside: of the transfer kernels' GPU "
         "time on the first device (traced over two fwd+bwd steps), the share during which "
         "a jax_flash kernel runs there too. Longest: the longest sequence whose "
         "fwd+bwd fits in device memory by the compiled memory analysis; with "
         "--longest-run, the longest that ran, stepping down ~4% from that length while a "
         f"step ran out of memory. Took {seconds:.0f} s.", "",
         "| devices | mode | seq | fwd ms | fwd+bwd ms | GiB per device | fwd+bwd without "
         "transfers | transfers only | hidden | overlapped | transfer kernels ms | beside |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  cell = lambda r, key, fmt: fmt.format(r[key]) if key in r else "-"
  for r in rows:
    error = r.get("error", "")
    failed = ("OOM" if _out_of_memory(error) else "err") if error else None
    out.append(" | ".join([
        f"| {r['devices']}", r["mode"], str(r.get("seq", "-")),
        failed or cell(r, "fwd_ms", "{:.2f}"), failed or cell(r, "fwdbwd_ms", "{:.2f}"),
        f"{r['bytes_per_device'] / 2**30:.2f}" if "bytes_per_device" in r else "-",
        cell(r, "fwdbwd_without_transfers_ms", "{:.2f}"),
        cell(r, "fwdbwd_without_attention_ms", "{:.2f}"),
        cell(r, "hidden", "{:.0%}"), r.get("transfers_overlapped", "-"),
        cell(r, "transfer_kernel_ms", "{:.2f}"),
        cell(r, "transfers_beside_attention", "{:.0%}")]) + " |")
  notes = [f"- {r['devices']} devices: by the analysis {r.get('seq_by_analysis', r['seq'])}"
           f" fits; the first length that did not: {r['first_miss']}"
           for r in rows if "first_miss" in r]
  if notes:
    out += ["", "Longest:", ""] + notes
  return "\n".join(out) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",") if x],
                 default=[16384, 65536, 262144], help="'' for none (with --longest)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--longest", action="store_true",
                 help="also find the longest sequence that fits, per device count")
  p.add_argument("--longest-run", action="store_true",
                 help="and run it once (minutes per step at such lengths)")
  p.add_argument("--devices", type=lambda s: [int(x) for x in s.split(",") if x],
                 help="device counts to measure (default: 1 and every power of two "
                      "up to the devices present)")
  add_run_arguments(p)
  args = p.parse_args(argv)
  if args.longest_run and os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE") == "false":
    p.error("--longest-run needs JAX's preallocated memory pool: unset "
            "XLA_PYTHON_CLIENT_PREALLOCATE")
  counts = args.devices or [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= len(jax.devices())]
  if any(n < 1 or n > len(jax.devices()) for n in counts):
    p.error(f"--devices {counts}: this process sees {len(jax.devices())} devices")
  timing, run_log = start_run(args, "ring")
  if args.quick:
    args.seqs, args.heads, args.head_dim = [64, 128], 2, 16
  for seq in args.seqs:
    cells = [(1, None)] * (1 in counts) + [
        (n, mode) for n in counts for mode in ("ring", "allgather") if seq % (2 * n) == 0]
    for n, mode in cells:
      run_log.record(measure(n, mode, seq, args, timing))
  if args.longest:
    for n in counts:
      run_log.record(longest(n, args))
  run_log.finish(markdown, "bench_ring.py", argv)


if __name__ == "__main__":
  main()
