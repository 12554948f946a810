"""GPU time per kernel of one attention step, from a `jax.profiler` trace.

Dense jax_flash against the same call with a block-sparse mask of every block on
and a random one at --density, each compiled once, warmed up and traced over
--steps steps: what each kernel (the attention kernels, the backward's passes,
XLA's own ops) takes per step, so that a gap between two calls can be put on
one kernel, on a pass around it, or on the host (the difference between a
benchmark's wall time and the GPU total here). Block masks are built outside
the jitted step, as a training loop would.

  python benchmarks/kernel_times.py --seq 16384 --head-dim 128 --mode fwdbwd
  python benchmarks/kernel_times.py --allow-cpu --seq 256 --head-dim 16   # smoke test
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import os
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jax_flash  # noqa: E402
from bench_attention import MODES, step_fn  # noqa: E402


def _kernel_events(profile: ProfileData, device: int):
  """The events of the GPU streams of `device`: its kernels and copies (the
  plane's other lines, XLA's ops and modules, span the kernels and would count
  them twice)."""
  for plane in profile.planes:
    if plane.name.endswith(f"GPU:{device}"):
      for line in plane.lines:
        if line.name.startswith("Stream"):
          yield from line.events


def kernel_times(profile: ProfileData, steps: int, device: int = 0) -> dict:
  """{kernel name: (microseconds per step, launches per step)} on `device`."""
  total, count = collections.Counter(), collections.Counter()
  for event in _kernel_events(profile, device):
    total[event.name] += event.duration_ns
    count[event.name] += 1
  return {name: (ns / 1e3 / steps, count[name] / steps) for name, ns in total.most_common()}


def _is_transfer(kernel: str) -> bool:
  name = kernel.lower()
  return "nccl" in name or "memcpy ptop" in name or "memcpy p2p" in name


def transfers_beside_attention(profile: ProfileData, steps: int,
                               device: int = 0) -> tuple[float, float] | None:
  """(microseconds per step of transfer kernels on `device`, the share of that
  time during which a jax_flash kernel runs on the same device), or None
  without transfers. A transfer that shares its time with the attention is
  hidden behind it; one that runs alone adds to the step."""
  attention, transfers = [], []
  for event in _kernel_events(profile, device):
    if "jax_flash" in event.name:
      attention.append((event.start_ns, event.end_ns))
    elif _is_transfer(event.name):
      transfers.append((event.start_ns, event.end_ns))
  if not transfers:
    return None
  merged = []  # the attention's busy time as disjoint intervals
  for start, end in sorted(attention):
    if merged and start <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], end)
    else:
      merged.append([start, end])
  total = sum(end - start for start, end in transfers)
  beside = sum(max(0.0, min(end, b) - max(start, a))
               for start, end in transfers for a, b in merged)
  return total / 1e3 / steps, beside / total


def trace_profile(fn, args, steps: int) -> ProfileData | None:
  """The profile of `steps` calls of fn(*args), after one untraced call."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      for _ in range(steps):
        out = fn(*args)
      jax.block_until_ready(out)
    paths = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)
    return ProfileData.from_file(paths[0]) if paths else None


def trace(fn, args, steps: int) -> dict:
  """kernel_times of `steps` calls of fn(*args), after one untraced call."""
  profile = trace_profile(fn, args, steps)
  return kernel_times(profile, steps) if profile is not None else {}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq", type=int, default=16384)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--tokens", type=int, default=16384, help="tokens per batch")
  p.add_argument("--mode", choices=MODES, default="fwdbwd")
  p.add_argument("--density", type=float, default=0.25, help="of the random block mask")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--top", type=int, default=8, help="kernels listed per call")
  p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke test)")
  args = p.parse_args(argv)
  if jax.devices()[0].platform != "gpu" and not args.allow_cpu:
    raise SystemExit("kernel_times: no GPU (use --allow-cpu for a smoke test)")

  batch = max(1, args.tokens // args.seq)
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (batch, args.seq, args.heads, args.head_dim)
  inputs = tuple(jax.random.normal(k, shape, jnp.bfloat16) for k in keys)
  rand = jax_flash.BlockSparseMask.random(jax.random.key(1), args.density, args.seq, args.seq)
  masks = {"all on": jax_flash.BlockSparseMask.local(args.seq, args.seq, None),
           f"random {args.density:g} (blocks on: {float(rand.density()):.3f})": rand}
  calls = {"dense": jax_flash.flash_attention}
  calls.update({name: functools.partial(jax_flash.flash_attention, block_mask=m)
                for name, m in masks.items()})

  print(f"{jax.devices()[0].device_kind}, bf16, batch {batch}, seq {args.seq}, "
        f"{args.heads} heads, head_dim {args.head_dim}, {args.mode}; microseconds per step "
        f"over {args.steps} steps")
  for name, attn in calls.items():
    times = trace(jax.jit(step_fn(attn, args.mode)), inputs, args.steps)
    print(f"\n{name}: GPU total {sum(us for us, _ in times.values()):.1f} us")
    for kernel, (us, launches) in list(times.items())[:args.top]:
      print(f"  {us:10.1f}  x{launches:g}  {kernel[:90]}")
    if not times:
      print("  (no GPU kernels traced)")


if __name__ == "__main__":
  main()
