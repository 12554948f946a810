"""Attention throughput and memory: jax_flash against its peers on one GPU.

The design brief's standard sweep: bf16, 16k tokens per batch
(batch = tokens // seq), hidden 2048 (heads = hidden // head_dim), seq 512..16k,
head_dim 64/128/256, causal and not, forward and forward+backward. Every peer
runs in the same process on the same GPU:

  jax_flash      jax_flash.flash_attention(implementation="cuda")
  xla            jax.nn.dot_product_attention(implementation="xla")
  cudnn          jax.nn.dot_product_attention(implementation="cudnn")
  pallas_triton  jax.experimental.pallas.ops.gpu.attention.mha
  jax_flash_xla  jax_flash.flash_attention(implementation="xla"), on request
  jax_flash_det  jax_flash.flash_attention(implementation="cuda", deterministic=True),
                 on request

Time: the median of 5 repeats of at least 20 ms each, the peers of a cell taking
turns repeat by repeat. FLOPs: forward 4*b*h*sq*sk*d (halved when causal),
forward+backward 3.5x that. The head_dim 128 non-causal seq-16k forward is held
against the rate of an 8192^3 `jnp.matmul`, taken before and after the sweep and
also beside that cell, taking turns with its peers (its row's peer is "matmul").
Memory: temp bytes of the compiled executable (`memory_analysis()`), known even
where running it would not fit.

Writes <out-dir>/<name>.jsonl (one row per peer and cell), <name>.md (the
table and summary) and, with cuDNN among the peers, <name>.png (jax_flash over
cuDNN for every cell), and prints the table last. `--plot-from <name>.jsonl`
redraws the plot of an earlier run.

  python benchmarks/bench_attention.py                         # full sweep
  python benchmarks/bench_attention.py --seqs 4096 --head-dims 128 --modes fwd
  python benchmarks/bench_attention.py --allow-cpu --quick --peers xla \\
      --seqs 128 --tokens 1024                         # smoke test on CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp

# Runnable as a script from anywhere in the source tree.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import jax_flash  # noqa: E402

PEERS = ("jax_flash", "xla", "cudnn", "pallas_triton")
ALL_PEERS = PEERS + ("jax_flash_xla", "jax_flash_det")
MODES = ("fwd", "fwdbwd")
# FLOPs of each mode in units of one forward pass.
MODE_FLOP_FACTOR = {"fwd": 1.0, "fwdbwd": 3.5}
DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Cell:
  mode: str
  causal: bool
  head_dim: int
  seq: int
  batch: int
  heads: int

  @property
  def flops(self) -> float:
    fwd = 4 * self.batch * self.heads * self.seq * self.seq * self.head_dim
    if self.causal:
      fwd /= 2
    return fwd * MODE_FLOP_FACTOR[self.mode]

  def label(self) -> str:
    return (f"{self.mode} {'causal' if self.causal else 'full'} "
            f"d{self.head_dim} s{self.seq}")


# -- peers ---------------------------------------------------------------------

def _pallas_triton(cell: Cell):
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention
  block_sizes = pallas_attention.BlockSizes.get_default()
  if cell.head_dim > 128:
    # The default 128x128 forward tiles need 320 KiB of shared memory at
    # head_dim 256; cap every tile at 64 so the peer runs instead of failing.
    block_sizes = dataclasses.replace(block_sizes, **{
        f.name: min(getattr(block_sizes, f.name), 64)
        for f in dataclasses.fields(block_sizes)
        if getattr(block_sizes, f.name) is not None})
  return functools.partial(
      pallas_attention.mha, segment_ids=None,
      sm_scale=1.0 / math.sqrt(cell.head_dim), causal=cell.causal,
      block_sizes=block_sizes)


def attention_fn(peer: str, cell: Cell):
  """(q, k, v) -> out, all [batch, seq, heads, head_dim]."""
  if peer in ("jax_flash", "jax_flash_xla", "jax_flash_det"):
    impl = "xla" if peer == "jax_flash_xla" else "cuda"
    return functools.partial(jax_flash.flash_attention, causal=cell.causal,
                             implementation=impl,
                             deterministic=peer == "jax_flash_det")
  if peer in ("xla", "cudnn"):
    return functools.partial(jax.nn.dot_product_attention,
                             is_causal=cell.causal, implementation=peer)
  if peer == "pallas_triton":
    return _pallas_triton(cell)
  raise ValueError(f"unknown peer {peer!r}; choose from {ALL_PEERS}")


def step_fn(attn, mode: str):
  """(q, k, v, dout) -> what one training or inference step computes."""
  if mode == "fwd":
    return lambda q, k, v, dout: attn(q, k, v)

  def fwdbwd(q, k, v, dout):
    out, pullback = jax.vjp(attn, q, k, v)
    return (out, *pullback(dout))
  return fwdbwd


# -- measuring -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Timing:
  repeats: int = 5          # median over this many repeats
  min_repeat_s: float = 0.02  # each repeat runs N iterations, N to reach this
  max_iters: int = 1000


def time_calls(fns, args, timing: Timing) -> list[float]:
  """Median seconds per call of each already compiled fn. The fns take turns,
  one repeat each, so that the GPU's clock and temperature drift over the
  measurement reaches all of them alike."""
  iters = []
  for fn in fns:
    jax.block_until_ready(fn(*args))  # warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - t0
    iters.append(max(1, min(timing.max_iters, math.ceil(timing.min_repeat_s / once))))
  per_call = [[] for _ in fns]
  for _ in range(timing.repeats):
    for fn, n, times in zip(fns, iters, per_call):
      t0 = time.perf_counter()
      for _ in range(n):
        out = fn(*args)
      jax.block_until_ready(out)
      times.append((time.perf_counter() - t0) / n)
  return [statistics.median(times) for times in per_call]


def time_call(fn, args, timing: Timing) -> float:
  """Median seconds per call of an already compiled fn."""
  return time_calls([fn], args, timing)[0]


def _error_text(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return f"{type(e).__name__}: {msg[0] if msg else ''}"[:400]


@functools.lru_cache(maxsize=None)
def _device_memory_bytes() -> int | None:
  try:
    return jax.devices()[0].memory_stats()["bytes_limit"]
  except Exception:  # noqa: BLE001 - CPU devices have no memory stats
    return None


def compile_peer(peer: str, cell: Cell, args):
  """The cell's row for a peer and its compiled step (None if it cannot run)."""
  row = dict(peer=peer, dtype=args[0].dtype.name, d=cell.head_dim, s=cell.seq,
             b=cell.batch, h=cell.heads, causal=cell.causal, mode=cell.mode)
  try:
    t0 = time.perf_counter()
    compiled = jax.jit(step_fn(attention_fn(peer, cell), cell.mode)).lower(
        *args).compile()
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    stats = compiled.memory_analysis()
    if stats is not None:
      row["temp_bytes"] = int(stats.temp_size_in_bytes)
      limit = _device_memory_bytes()
      if limit and row["temp_bytes"] > limit:
        row["error"] = (f"RESOURCE_EXHAUSTED: temp memory "
                        f"{row['temp_bytes'] / 2**30:.1f} GiB exceeds the "
                        f"device's {limit / 2**30:.1f} GiB (not run)")
        return row, None
    jax.block_until_ready(compiled(*args))  # a failure to run is the peer's error
    return row, compiled
  except Exception as e:  # noqa: BLE001 - every failure is a result to record
    row["error"] = _error_text(e)
    return row, None


def measure_cell(peers, cell: Cell, args, timing: Timing, matmul=None) -> list[dict]:
  """One row per peer; the peers that run are timed side by side (time_calls).
  With `matmul` (matmul_beside) its row follows, timed taking turns with them."""
  compiled = [compile_peer(peer, cell, args) for peer in peers]
  runnable = [(row, fn, cell.flops) for row, fn in compiled if fn is not None]
  extra = []
  if matmul is not None:
    row, fn, flops = matmul
    extra.append(dict(row, mode=cell.mode, causal=cell.causal, d=cell.head_dim, s=cell.seq,
                      b=cell.batch, h=cell.heads))
    runnable.append((extra[0], fn, flops))
  try:
    seconds = time_calls([fn for _, fn, _ in runnable], args, timing)
  except Exception as e:  # noqa: BLE001 - every failure is a result to record
    for row, _, _ in runnable:
      row["error"] = _error_text(e)
    return [row for row, _ in compiled] + extra
  for (row, _, flops), t in zip(runnable, seconds):
    row["ms"] = t * 1e3
    row["tflops"] = flops / t / 1e12
  return [row for row, _ in compiled] + extra


def _matmul(dtype, n: int):
  a, b = (jax.random.normal(key, (n, n), dtype) for key in jax.random.split(jax.random.key(0)))
  return jax.jit(jnp.matmul).lower(a, b).compile(), (a, b), 2 * n**3


def matmul_rate(dtype, n: int = 8192) -> float:
  """TFLOP/s of an n x n x n `jnp.matmul` in `dtype`: the GPU's matrix-product
  rate in this process, which the attention figures are held against."""
  compiled, operands, flops = _matmul(dtype, n)
  return flops / time_call(compiled, operands, Timing()) / 1e12


# The cell whose forward is held against the matmul rate.
CEILING_CELL = ("fwd", False, 128, 16384)


def matmul_beside(dtype, n: int = 8192):
  """(row, fn, flops) of an n x n x n `jnp.matmul` for measure_cell: fn takes
  the cell's arguments and ignores them, so that the matmul takes turns with the
  cell's peers, repeat by repeat, at the clocks and temperature they run at
  (a rate taken before or after a sweep is one of a cooler or a hotter GPU)."""
  compiled, operands, flops = _matmul(dtype, n)
  row = dict(peer="matmul", dtype=jnp.dtype(dtype).name, n=n)
  return row, lambda *_: compiled(*operands), flops


def make_inputs(cell: Cell, dtype, seed: int):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (cell.batch, cell.seq, cell.heads, cell.head_dim)
  return tuple(jax.random.normal(key, shape, dtype) for key in keys)


# -- the sweep -----------------------------------------------------------------

def sweep_cells(seqs, head_dims, modes, tokens, hidden):
  for head_dim in head_dims:
    for seq in seqs:
      for causal in (False, True):
        for mode in modes:
          yield Cell(mode=mode, causal=causal, head_dim=head_dim, seq=seq,
                     batch=max(1, tokens // seq),
                     heads=max(1, hidden // head_dim))


def run_sweep(args, cells, timing, log_file):
  """Rows of every peer on every cell run, and how many cells were not run."""
  dtype = DTYPES[args.dtype]
  rows = []
  start = time.perf_counter()
  for i, cell in enumerate(cells):
    if args.time_limit_s and time.perf_counter() - start > args.time_limit_s:
      print(f"time limit {args.time_limit_s:.0f} s reached: "
            f"{len(cells) - i} cells not run", flush=True)
      return rows, len(cells) - i
    inputs = make_inputs(cell, dtype, seed=i)
    ceiling = ((cell.mode, cell.causal, cell.head_dim, cell.seq) == CEILING_CELL
               and "jax_flash" in args.peers and jax.devices()[0].platform == "gpu")
    matmul = matmul_beside(dtype) if ceiling else None
    for row in measure_cell(args.peers, cell, inputs, timing, matmul):
      rows.append(row)
      log_file.write(json.dumps(row) + "\n")
      log_file.flush()
      print(_progress_line(row), flush=True)
    del inputs
  return rows, 0


def _progress_line(row) -> str:
  head = (f"{row['peer']:>14} {row['mode']:>6} "
          f"{'causal' if row['causal'] else 'full':>6} d{row['d']:<3} "
          f"s{row['s']:<5} b{row['b']} h{row['h']}")
  if "error" in row:
    return f"{head}  ERROR {row['error'][:160]}"
  mem = row.get("temp_bytes")
  mem = f"{mem / 2**20:10.1f} MiB" if mem is not None else ""
  return f"{head}  {row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s {mem}"


# -- reporting -----------------------------------------------------------------

def _index(rows):
  return {(r["peer"], r["mode"], r["causal"], r["d"], r["s"]): r for r in rows}


def _tflops_text(row) -> str:
  if row is None:
    return "-"
  if "error" in row:
    return "OOM" if "RESOURCE_EXHAUSTED" in row["error"] else "err"
  tflops = row["tflops"]
  return f"{tflops:.0f}" if tflops >= 100 else f"{tflops:.3g}"


def _ratio(a, b):
  if a is None or b is None or "tflops" not in a or "tflops" not in b:
    return None
  return a["tflops"] / b["tflops"]


def _mib(row) -> str:
  if row is None or "temp_bytes" not in row:
    return "-"
  return f"{row['temp_bytes'] / 2**20:.0f}"


def markdown_table(rows, peers) -> str:
  idx = _index(rows)
  cells = sorted({(r["mode"], r["causal"], r["d"], r["s"]) for r in rows},
                 key=lambda c: (MODES.index(c[0]), c[1], c[2], c[3]))
  others = [p for p in peers if p != "jax_flash"]
  header = (["mode", "causal", "d", "seq", "jax_flash"] + others +
            ["jf/cudnn", "jf/xla", "MiB jf", "MiB xla"])
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for mode, causal, d, s in cells:
    get = lambda p: idx.get((p, mode, causal, d, s))
    jf = get("jax_flash")
    ratios = [_ratio(jf, get(p)) for p in ("cudnn", "xla")]
    line = ([mode, "y" if causal else "n", str(d), str(s), _tflops_text(jf)] +
            [_tflops_text(get(p)) for p in others] +
            ["-" if r is None else f"{r:.2f}" for r in ratios] +
            [_mib(jf), _mib(get("xla"))])
    lines.append("| " + " | ".join(line) + " |")
  return "\n".join(lines)


def summary_lines(rows, matmul_tflops=None):
  idx = _index(rows)
  get = lambda p, mode, causal, d, s: idx.get((p, mode, causal, d, s))
  out = []

  ceiling = get("jax_flash", *CEILING_CELL)
  if matmul_tflops and ceiling and "tflops" in ceiling:
    out.append(f"jax_flash d128 s16384 full fwd: {ceiling['tflops']:.0f} TFLOP/s, "
               f"{ceiling['tflops'] / matmul_tflops:.3f} of the matmul rate "
               f"({matmul_tflops:.0f} TFLOP/s)")
  beside = get("matmul", *CEILING_CELL)
  if ceiling and "tflops" in ceiling and beside and "tflops" in beside:
    out.append(f"jax_flash d128 s16384 full fwd: {ceiling['tflops']:.0f} TFLOP/s, "
               f"{ceiling['tflops'] / beside['tflops']:.3f} of the matmul rate taken "
               f"beside it, repeat by repeat ({beside['tflops']:.0f} TFLOP/s)")

  for mode in MODES + (None,):
    ratios = []
    for (peer, m, causal, d, s), row in idx.items():
      if (peer != "jax_flash" or (mode and m != mode) or d not in (64, 128)
          or not 2048 <= s <= 16384):
        continue
      r = _ratio(row, get("cudnn", m, causal, d, s))
      if r is not None:
        ratios.append((r, f"{m} {'causal' if causal else 'full'} d{d} s{s}"))
    if ratios:
      worst = min(ratios)
      out.append(f"jax_flash/cuDNN, d 64/128, seq 2k-16k, "
                 f"{mode or 'all modes'}: min {worst[0]:.2f} ({worst[1]}), "
                 f"mean {statistics.mean(r for r, _ in ratios):.2f} "
                 f"over {len(ratios)} cells")

  parts = []
  for d in (64, 128):
    for causal in (False, True):
      r = _ratio(get("jax_flash", "fwdbwd", causal, d, 4096),
                 get("xla", "fwdbwd", causal, d, 4096))
      if r is not None:
        parts.append(f"d{d} {'causal' if causal else 'full'} {r:.2f}x")
  if parts:
    out.append("seq 4k fwdbwd speedup vs XLA: " + ", ".join(parts))

  parts = []
  for d in (64, 128, 256):
    for causal in (False, True):
      jf = get("jax_flash", "fwdbwd", causal, d, 16384)
      xla = get("xla", "fwdbwd", causal, d, 16384)
      if jf and xla and jf.get("temp_bytes") and "temp_bytes" in xla:
        parts.append(f"d{d} {'causal' if causal else 'full'} "
                     f"{xla['temp_bytes'] / jf['temp_bytes']:.0f}x")
  if parts:
    out.append("seq 16k fwdbwd temp memory XLA/jax_flash: " + ", ".join(parts))
  return out


def ratio_plot(rows, path: pathlib.Path, title: str):
  """jax_flash / cuDNN for every cell: one panel per mode and head dim, x the
  sequence length, a line each for causal and full, each point labelled."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  idx = _index(rows)
  modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
  dims = sorted({r["d"] for r in rows})
  fig, axes = plt.subplots(len(modes), len(dims), squeeze=False, sharey=True,
                           figsize=(3.6 * len(dims), 3.0 * len(modes)))
  for i, mode in enumerate(modes):
    for j, d in enumerate(dims):
      ax = axes[i][j]
      seqs = sorted({r["s"] for r in rows if r["mode"] == mode and r["d"] == d})
      # Labels above the full line's points, below the causal line's.
      for causal, style, dy in ((False, "o-", 5), (True, "s--", -11)):
        points = [(s, _ratio(idx.get(("jax_flash", mode, causal, d, s)),
                             idx.get(("cudnn", mode, causal, d, s)))) for s in seqs]
        points = [(s, r) for s, r in points if r is not None]
        if not points:
          continue
        ax.plot(*zip(*points), style, label="causal" if causal else "full")
        for s, r in points:
          ax.annotate(f"{r:.2f}", (s, r), textcoords="offset points", xytext=(0, dy),
                      ha="center", fontsize=7)
      ax.axhline(1.0, color="gray", lw=0.8)
      ax.set_xscale("log", base=2)
      ax.set_title(f"{mode}, head_dim {d}", fontsize=9)
      ax.grid(alpha=0.3)
      if i == len(modes) - 1:
        ax.set_xlabel("sequence length")
      if j == 0:
        ax.set_ylabel("jax_flash / cuDNN")
  axes[0][0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


class RunLog:
  """The rows of a benchmark run: printed as they come and appended to
  <out_dir>/<name>.jsonl, so a run cut short keeps what it measured; `finish`
  writes and prints the markdown table."""

  def __init__(self, out_dir: pathlib.Path, name: str):
    out_dir.mkdir(parents=True, exist_ok=True)
    self.jsonl, self.md = out_dir / f"{name}.jsonl", out_dir / f"{name}.md"
    self.jsonl.write_text("")
    self.rows, self.start = [], time.perf_counter()

  def record(self, row: dict):
    self.rows.append(row)
    print(json.dumps(row), flush=True)
    with self.jsonl.open("a") as f:
      f.write(json.dumps(row) + "\n")

  def finish(self, markdown, script: str, argv) -> str:
    """markdown(rows, command, seconds) -> the table, written and printed."""
    command = f"python benchmarks/{script} " + " ".join(
        argv if argv is not None else sys.argv[1:])
    text = markdown(self.rows, command.strip(), time.perf_counter() - self.start)
    self.md.write_text(text)
    print(text)
    return text


def add_run_arguments(p: argparse.ArgumentParser):
  """The options of the scripts built on RunLog."""
  p.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
  p.add_argument("--name", default=None, help="output file stem (after the script's prefix)")
  p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
  p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke test)")


def start_run(args, prefix: str) -> tuple[Timing, RunLog]:
  """The timing and log of a run of such a script; refuses to time a CPU
  unless --allow-cpu."""
  if jax.devices()[0].platform != "gpu" and not args.allow_cpu:
    raise SystemExit(f"{prefix}: no GPU (use --allow-cpu for a smoke test)")
  timing = Timing(repeats=2, min_repeat_s=0.0, max_iters=1) if args.quick else Timing()
  return timing, RunLog(args.out_dir, f"{prefix}-" + (args.name or _default_name()))


def _default_name() -> str:
  kind = jax.devices()[0].device_kind
  slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "device"
  return f"{slug}-{datetime.date.today().isoformat()}"


# -- command line --------------------------------------------------------------

def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def _names(allowed):
  def parse(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in allowed]
    if bad:
      raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {allowed}")
    return names
  return parse


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--seqs", type=_ints, default=None,
                 help="comma-separated sequence lengths "
                      "(default 512,...,16384; with --quick 1024,4096,16384)")
  p.add_argument("--head-dims", type=_ints, default=[64, 128, 256],
                 help="comma-separated head dims (default 64,128,256)")
  p.add_argument("--modes", type=_names(MODES), default=list(MODES),
                 help="comma-separated: fwd,fwdbwd (default both)")
  p.add_argument("--peers", type=_names(ALL_PEERS), default=list(PEERS),
                 help=f"comma-separated from {','.join(ALL_PEERS)} "
                      f"(default {','.join(PEERS)})")
  p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
  p.add_argument("--tokens", type=int, default=16384,
                 help="tokens per batch: batch = tokens // seq (default 16384)")
  p.add_argument("--hidden", type=int, default=2048,
                 help="heads = hidden // head_dim (default 2048)")
  p.add_argument("--out-dir", type=pathlib.Path,
                 default=pathlib.Path("benchmarks/results"))
  p.add_argument("--name", default=None,
                 help="output file stem (default <gpu>-<date>)")
  p.add_argument("--repeats", type=int, default=Timing.repeats,
                 help="timed repeats per cell (the median is reported)")
  p.add_argument("--quick", action="store_true",
                 help="fewer timing repeats, and seq 1k/4k/16k unless --seqs")
  p.add_argument("--time-limit-s", type=float, default=0,
                 help="start no new cell after this many seconds (0: no limit)")
  p.add_argument("--allow-cpu", action="store_true",
                 help="run without a GPU (smoke test of this script)")
  p.add_argument("--plot-from", type=pathlib.Path, default=None, metavar="JSONL",
                 help="only draw the ratio plot of an earlier run (<stem>.png "
                      "beside it); needs no GPU")
  args = p.parse_args(argv)
  if args.seqs is None:
    args.seqs = ([1024, 4096, 16384] if args.quick else
                 [512, 1024, 2048, 4096, 8192, 16384])
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.plot_from is not None:
    rows = [json.loads(line) for line in args.plot_from.read_text().splitlines() if line]
    png = args.plot_from.with_suffix(".png")
    ratio_plot(rows, png, f"jax_flash / cuDNN ({args.plot_from.stem})")
    print(f"wrote {png}")
    return
  device = jax.devices()[0]
  if device.platform != "gpu" and not args.allow_cpu:
    sys.exit(f"no GPU visible to JAX (found {device}); pass --allow-cpu to "
             "run this benchmark anyway")
  timing = Timing(repeats=2, min_repeat_s=0.01) if args.quick else Timing(repeats=args.repeats)
  cells = list(sweep_cells(args.seqs, args.head_dims, args.modes, args.tokens,
                           args.hidden))
  name = args.name or _default_name()
  args.out_dir.mkdir(parents=True, exist_ok=True)
  jsonl_path = args.out_dir / f"{name}.jsonl"
  md_path = args.out_dir / f"{name}.md"
  command = " ".join(["python", *sys.argv]) if argv is None else str(argv)
  print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}; "
        f"{len(cells)} cells x {len(args.peers)} peers", flush=True)

  # The matmul rate is taken before and after the sweep, and the higher one
  # kept: a GPU that has not yet reached its clocks reads low.
  matmul_runs = []
  if device.platform == "gpu":
    matmul_runs.append(matmul_rate(DTYPES[args.dtype]))
    print(f"{args.dtype} matmul 8192^3: {matmul_runs[-1]:.0f} TFLOP/s", flush=True)

  t0 = time.perf_counter()
  with open(jsonl_path, "w") as log_file:
    rows, not_run = run_sweep(args, cells, timing, log_file)
  elapsed = time.perf_counter() - t0
  if matmul_runs:
    matmul_runs.append(matmul_rate(DTYPES[args.dtype]))
    print(f"{args.dtype} matmul 8192^3: {matmul_runs[-1]:.0f} TFLOP/s", flush=True)
  matmul_tflops = max(matmul_runs, default=None)

  table = markdown_table(rows, args.peers)
  summary = summary_lines(rows, matmul_tflops)
  errors = sorted({f"{r['peer']}: {r['error']}" for r in rows if "error" in r})
  md = [f"# Attention benchmark: {device.device_kind}, "
        f"{datetime.date.today().isoformat()}",
        "",
        f"Command: `{command}`  ",
        f"jax {jax.__version__}, {args.dtype}, batch = {args.tokens} // seq, "
        f"heads = {args.hidden} // head_dim; TFLOP/s (fwd 4·b·h·s²·d, "
        f"halved causal; fwdbwd 3.5x); jf/peer = jax_flash TFLOP/s over the "
        f"peer's; MiB = compiled temp memory"
        + (f"; {args.dtype} matmul rate (8192³ `jnp.matmul`, this run, the higher "
           f"of before and after the sweep: "
           f"{' and '.join(f'{r:.0f}' for r in matmul_runs)}) {matmul_tflops:.0f} TFLOP/s"
           if matmul_tflops else "")
        + f". Sweep took {elapsed:.0f} s"
        + (f"; stopped at the time limit with {not_run} of {len(cells)} "
           "cells not run." if not_run else "."),
        "",
        table]
  if summary:
    md += ["", *[f"- {line}" for line in summary]]
  if errors:
    shown = 15
    md += ["", "Errors (first line of each distinct one):", ""]
    md += [f"- `{e}`" for e in errors[:shown]]
    if len(errors) > shown:
      md.append(f"- ... {len(errors) - shown} more in {jsonl_path.name}")
  md_path.write_text("\n".join(md) + "\n")
  png_path = args.out_dir / f"{name}.png"
  if any(r["peer"] == "cudnn" for r in rows):
    ratio_plot(rows, png_path, f"jax_flash / cuDNN, {device.device_kind}")

  print(f"\nwrote {jsonl_path} and {md_path} ({elapsed:.0f} s)\n")
  for line in summary:
    print(line)
  print()
  print(table, flush=True)


if __name__ == "__main__":
  main()
