"""Block-sparse attention on one GPU: time against the fraction of blocks on.

For each sequence length and head_dim, dense jax_flash (no block mask), the
same with a mask of every block on (the block-sparse path's cost per tile) and
with every block off (its floor: launches, the backward's passes over whole
arrays, zeros written), and butterfly, local and random masks at several
densities, forward and forward+backward, all in one process, non-causal. Per
shape and mode a least-squares line time = overhead + slope * density through
the random masks gives the fixed overhead and the time at density 0.25; each
row reports its time over (dense time x density) + that overhead, which
FlashAttention's block-sparse claim keeps within 1.25.

Time: the median of repeats, the rows of a shape taking turns (bench_attention's
time_calls). Writes <out-dir>/<name>.jsonl and .md and prints the table last.

  python benchmarks/bench_block_sparse.py --out-dir benchmarks/results
  python benchmarks/bench_block_sparse.py --allow-cpu --quick   # smoke test on CPU
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jax_flash  # noqa: E402
from bench_attention import Timing, add_run_arguments, start_run  # noqa: E402
from bench_variants import inputs, measure_row  # noqa: E402

BlockSparseMask = jax_flash.BlockSparseMask
MODES = ("fwd", "fwdbwd")


def masks(seq: int, block: int, densities) -> list[tuple[str, float, BlockSparseMask]]:
  """(pattern, density, mask) of every row of a shape."""
  n = -(-seq // block)
  size = (block, block)
  rows = [("all on", 1.0, BlockSparseMask.local(seq, seq, None, size)),
          ("all off", 0.0, BlockSparseMask(jax.numpy.zeros((n, n), bool), size))]
  butterfly = BlockSparseMask.butterfly(seq, seq, size)
  rows.append(("butterfly", float(butterfly.density()), butterfly))
  for density in densities:
    half = max(0, round((density * n - 1) / 2))  # 2 * half + 1 blocks a row
    local = BlockSparseMask.local(seq, seq, half, size)
    rows.append(("local", float(local.density()), local))
    rand = BlockSparseMask.random(jax.random.key(round(density * 1000)), density, seq, seq,
                                  block_size=size)
    rows.append(("random", float(rand.density()), rand))
  return rows


def run(args, timing: Timing, record):
  dtype = jax.numpy.bfloat16
  for d in args.head_dims:
    for seq in args.seqs:
      batch = max(1, args.tokens // seq)
      qkv = inputs(batch, seq, args.heads, d, dtype, seed=seq + d)
      shape = dict(seq=seq, head_dim=d, batch=batch, heads=args.heads)
      peers = {"dense": jax_flash.flash_attention}
      labels = {"dense": ("dense", 1.0)}
      for pattern, density, m in masks(seq, args.block, args.densities):
        name = f"{pattern} {density:.3f}"
        peers[name] = functools.partial(jax_flash.flash_attention, block_mask=m)
        labels[name] = (pattern, density)
      for mode in args.modes:
        for row in measure_row("block_sparse", f"seq {seq} d {d}", peers, qkv, mode,
                               timing, **shape):
          row["pattern"], row["density"] = labels[row["peer"]]
          record(row)


def overhead_fit(rows):
  """(overhead ms, slope ms) of time = overhead + slope * density through the
  random masks of one shape and mode; None without two of them."""
  points = [(r["density"], r["ms"]) for r in rows if r["pattern"] == "random" and "ms" in r]
  if len(points) < 2:
    return None
  x, y = np.array(points).T
  slope, overhead = np.polyfit(x, y, 1)
  return float(overhead), float(slope)


def markdown(rows, command: str, seconds: float) -> str:
  device = jax.devices()[0].device_kind
  family = (" The sm80 kernel family served every call (JAX_FLASH_KERNELS=sm80)."
            if os.environ.get("JAX_FLASH_KERNELS") == "sm80" else
            " On Hopper both run the sm90 kernels.")
  out = [f"# Block-sparse attention: {device}, {time.strftime('%Y-%m-%d')}", "",
         f"Command: `{command}`  ",
         f"jax {jax.__version__}, bf16, non-causal; ms = median time of one call (fwd) or "
         "of one forward and backward (fwdbwd); x dense = dense time over this row's; "
         "vs model = this row's time over (dense time x density + the overhead fitted "
         f"through the random masks of the shape).{family} Took {seconds:.0f} s.", "",
         "| shape | mode | pattern | density | ms | x dense | vs model |",
         "|---|---|---|---|---|---|---|"]
  notes = []
  for label in dict.fromkeys(r["label"] for r in rows):
    for mode in dict.fromkeys(r["mode"] for r in rows):
      part = [r for r in rows if r["label"] == label and r["mode"] == mode]
      dense = next((r for r in part if r["pattern"] == "dense" and "ms" in r), None)
      fit = overhead_fit(part)
      if fit:
        at_quarter = fit[0] + 0.25 * fit[1]
        notes.append(f"- {label}, {mode}: overhead {fit[0]:.3f} ms, "
                     f"slope {fit[1]:.3f} ms per unit density; at density 0.25 "
                     f"{at_quarter:.3f} ms"
                     + (f", {dense['ms'] / at_quarter:.2f}x dense" if dense else ""))
      for r in part:
        if "ms" not in r:
          cell = "OOM" if "RESOURCE_EXHAUSTED" in r.get("error", "") else "err"
          out.append(f"| {label} | {mode} | {r['pattern']} | {r['density']:.3f} | {cell} "
                     "| - | - |")
          continue
        speedup = f"{dense['ms'] / r['ms']:.2f}" if dense else "-"
        model = (f"{r['ms'] / (dense['ms'] * r['density'] + fit[0]):.2f}"
                 if dense and fit and r["pattern"] != "dense" else "-")
        out.append(f"| {label} | {mode} | {r['pattern']} | {r['density']:.3f} | "
                   f"{r['ms']:.3f} | {speedup} | {model} |")
  return "\n".join(out + ["", "Fitted overheads:", ""] + notes + [""])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")],
                 default=[4096, 8192, 16384])
  p.add_argument("--head-dims", type=lambda s: [int(x) for x in s.split(",")],
                 default=[64, 128])
  p.add_argument("--densities", type=lambda s: [float(x) for x in s.split(",")],
                 default=[0.1, 0.25, 0.5])
  p.add_argument("--tokens", type=int, default=16384, help="tokens per batch")
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--block", type=int, default=128, help="square block size")
  p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
  add_run_arguments(p)
  args = p.parse_args(argv)
  timing, run_log = start_run(args, "block-sparse")
  if args.quick:
    args.seqs, args.head_dims, args.tokens, args.heads = [256], [64], 512, 2
    args.block, args.densities = 32, [0.25, 0.5]
  run(args, timing, run_log.record)
  run_log.finish(markdown, "bench_block_sparse.py", argv)


if __name__ == "__main__":
  main()
