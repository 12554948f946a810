"""Attention variants on one GPU, every peer in the same process:

  cost     each variant (window, softcap, ALiBi, segment ids, dropout, bias,
           mask) against plain causal attention at one shape, jax_flash and,
           where it has the variant, cuDNN (`jax.nn.dot_product_attention`)
  scaling  a fixed causal window, and packed documents of a fixed length, as
           the sequence grows at constant tokens per batch: the time stays flat
           when the blocks outside the window or between documents are skipped
  packing  one row of documents packed with segment ids against the same
           documents as a batch (jax_flash, and cuDNN with sequence lengths)

Time: the median of repeats, the peers of a row taking turns (bench_attention's
time_calls). Writes <out-dir>/<name>.jsonl and .md and prints the table last.

  python benchmarks/bench_variants.py --out-dir benchmarks/results
  python benchmarks/bench_variants.py --allow-cpu --quick   # smoke test on CPU
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jax_flash  # noqa: E402
from bench_attention import (  # noqa: E402
    Timing, _error_text, add_run_arguments, start_run, step_fn, time_calls)

MODES = ("fwd", "fwdbwd")
SECTIONS = ("cost", "scaling", "packing")


def documents(batch: int, length: int, count: int):
  """Segment ids [batch, length] of `count` equal documents per row."""
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) // (length // count),
                          (batch, length))


def cost_peers(name: str, shape: dict, window: int, docs: int):
  """{peer: attention(q, k, v)} for variant `name` (causal throughout)."""
  b, s, h = shape["batch"], shape["seq"], shape["heads"]
  flash = functools.partial(jax_flash.flash_attention, causal=True)
  cudnn = functools.partial(jax.nn.dot_product_attention, is_causal=True,
                            implementation="cudnn")
  key = jax.random.key(1)
  if name == "plain":
    return {"jax_flash": flash, "cudnn": cudnn}
  if name == "window":
    return {"jax_flash": functools.partial(flash, window_size=(window, 0)),
            "cudnn": functools.partial(cudnn, local_window_size=(window, 0))}
  if name == "softcap":
    return {"jax_flash": functools.partial(flash, softcap=30.0)}
  if name == "alibi":
    slopes = 2.0 ** (-8.0 * jnp.arange(1, h + 1) / h)
    return {"jax_flash": functools.partial(flash, alibi_slopes=slopes)}
  if name == "segments":
    ids = documents(b, s, docs)
    return {"jax_flash": functools.partial(flash, segment_ids=(ids, ids))}
  if name == "dropout":
    return {"jax_flash": functools.partial(flash, dropout_rate=0.1, dropout_rng=key)}
  if name == "bias":
    bias = jax.random.normal(key, (1, 1, s, s), jnp.bfloat16)
    return {"jax_flash": functools.partial(flash, bias=bias),
            "cudnn": functools.partial(cudnn, bias=bias)}
  if name == "mask":
    mask = jax.random.bernoulli(key, 0.9, (1, 1, s, s))
    return {"jax_flash": functools.partial(flash, mask=mask),
            "cudnn": functools.partial(cudnn, mask=mask)}
  raise ValueError(name)


def inputs(batch, seq, heads, head_dim, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return tuple(jax.random.normal(k, (batch, seq, heads, head_dim), dtype) for k in keys)


def measure_row(section: str, label: str, peers: dict, args, mode: str,
                timing: Timing, **fields) -> list[dict]:
  """One result per peer; the peers that compile take turns being timed."""
  rows, fns = [], []
  for peer, attn in peers.items():
    row = dict(section=section, label=label, peer=peer, mode=mode, **fields)
    try:
      fn = jax.jit(step_fn(attn, mode)).lower(*args).compile()
      jax.block_until_ready(fn(*args))
      fns.append((row, fn))
    except Exception as e:  # noqa: BLE001 - every failure is a result to record
      row["error"] = _error_text(e)
    rows.append(row)
  try:
    for (row, _), sec in zip(fns, time_calls([fn for _, fn in fns], args, timing)):
      row["ms"] = sec * 1e3
  except Exception as e:  # noqa: BLE001
    for row, _ in fns:
      row["error"] = _error_text(e)
  return rows


def run(args, timing: Timing, record):
  dtype = jnp.bfloat16
  d, h = args.head_dim, args.heads
  shape = dict(batch=max(1, args.tokens // args.seq), seq=args.seq, heads=h)
  qkv = inputs(shape["batch"], args.seq, h, d, dtype)
  for name in () if "cost" not in args.sections else ("plain", "window", "softcap", "alibi", "segments", "dropout",
               "bias", "mask"):
    for mode in args.modes:
      for row in measure_row("cost", name, cost_peers(name, shape, args.window,
                                                      args.documents[-1]),
                             qkv, mode, timing, **shape):
        record(row)

  for seq in args.window_seqs if "scaling" in args.sections else ():
    batch = max(1, args.tokens // seq)
    qkv = inputs(batch, seq, h, d, dtype, seed=seq)
    flash = functools.partial(jax_flash.flash_attention, causal=True)
    ids = documents(batch, seq, seq // args.window)
    peers = {"jax_flash": functools.partial(flash, window_size=(args.window, 0)),
             "cudnn": functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                        implementation="cudnn",
                                        local_window_size=(args.window, 0)),
             "jax_flash_packed": functools.partial(flash, segment_ids=(ids, ids)),
             "jax_flash_causal": flash}
    for mode in args.modes:
      for row in measure_row("scaling", f"seq {seq}", peers, qkv, mode, timing,
                             seq=seq, batch=batch, heads=h):
        record(row)

  for count in args.documents if "packing" in args.sections else ():
    length = args.seq // count
    packed = inputs(1, args.seq, h, d, dtype, seed=count)
    apart = tuple(x.reshape(count, length, h, d) for x in packed)
    ids = documents(1, args.seq, count)
    lengths = jnp.full((count,), length, jnp.int32)
    for mode in args.modes:
      rows = measure_row("packing", f"{count} x {length}", {
          "jax_flash_packed": functools.partial(
              jax_flash.flash_attention, causal=True, segment_ids=(ids, ids))},
          packed, mode, timing, documents=count, length=length)
      rows += measure_row("packing", f"{count} x {length}", {
          "jax_flash_apart": functools.partial(jax_flash.flash_attention, causal=True),
          "cudnn_apart": functools.partial(
              jax.nn.dot_product_attention, is_causal=True, implementation="cudnn",
              query_seq_lengths=lengths, key_value_seq_lengths=lengths)},
          apart, mode, timing, documents=count, length=length)
      for row in rows:
        record(row)


def markdown(rows, command: str, seconds: float) -> str:
  device = jax.devices()[0].device_kind
  out = [f"# Attention variants: {device}, {time.strftime('%Y-%m-%d')}", "",
         f"Command: `{command}`  ",
         f"jax {jax.__version__}, bf16, causal; ms = median time of one call (fwd) or of "
         "one forward and backward (fwdbwd); x plain = over the same peer's plain "
         f"causal attention in the cost section. Took {seconds:.0f} s.", "",
         "jax_flash runs windows, soft cap, ALiBi, segment ids and dropout on its sm80 "
         "kernel family, except that on Hopper the sm90 forward takes windows, the soft "
         "cap, segment ids and ALiBi (the dispatcher falls back to the sm80 family for "
         "dropout and these variants' backward); mask and bias on its portable path."
         + (" This run forced the sm80 family for every call (JAX_FLASH_KERNELS=sm80)."
            if os.environ.get("JAX_FLASH_KERNELS") == "sm80" else ""), ""]
  cell = lambda r: ("OOM" if "RESOURCE_EXHAUSTED" in r["error"] else "err") \
      if "error" in r else f"{r['ms']:.2f}"
  for section, title in (("cost", "What each variant costs"),
                         ("scaling", "A fixed window (jax_flash, cudnn) and documents "
                          "of the window's length (jax_flash_packed) as the sequence grows, "
                          "at constant tokens"),
                         ("packing", "Packed documents against the same documents apart")):
    part = [r for r in rows if r["section"] == section]
    if not part:
      continue
    peers = list(dict.fromkeys(r["peer"] for r in part))
    out += [f"## {title}", "", "| row | mode | " + " | ".join(f"{p} ms" for p in peers)
            + (" | jax_flash x plain |" if section == "cost" else " |"),
            "|" + "---|" * (2 + len(peers) + (section == "cost"))]
    plain = {r["mode"]: r for r in part if r["label"] == "plain" and r["peer"] == "jax_flash"}
    for label in dict.fromkeys(r["label"] for r in part):
      for mode in dict.fromkeys(r["mode"] for r in part):
        by = {r["peer"]: r for r in part if r["label"] == label and r["mode"] == mode}
        line = f"| {label} | {mode} | " + " | ".join(
            cell(by[p]) if p in by else "-" for p in peers)
        if section == "cost":
          r, p0 = by.get("jax_flash", {}), plain.get(mode, {})
          line += " | " + (f"{r['ms'] / p0['ms']:.2f}" if "ms" in r and "ms" in p0 else "-")
        out.append(line + " |")
    out.append("")
  return "\n".join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq", type=int, default=8192, help="cost and packing sections")
  p.add_argument("--tokens", type=int, default=16384, help="tokens per batch")
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--window", type=int, default=1024,
                 help="left window, causal; also the document length in the scaling section")
  p.add_argument("--window-seqs", type=lambda s: [int(x) for x in s.split(",")],
                 default=[4096, 8192, 16384, 32768])
  p.add_argument("--documents", type=lambda s: [int(x) for x in s.split(",")],
                 default=[4, 16, 64])
  p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
  p.add_argument("--sections", type=lambda s: s.split(","), default=list(SECTIONS),
                 help="of " + ", ".join(SECTIONS))
  add_run_arguments(p)
  args = p.parse_args(argv)
  timing, run_log = start_run(args, "variants")
  if args.quick:
    args.seq, args.tokens, args.heads, args.head_dim = 256, 512, 2, 64
    args.window, args.window_seqs, args.documents = 64, [128, 256], [2, 4]
  run(args, timing, run_log.record)
  run_log.finish(markdown, "bench_variants.py", argv)


if __name__ == "__main__":
  main()
