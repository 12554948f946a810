"""End-to-end training steps with jax_flash, XLA and cuDNN attention on one GPU.

  GPT-2 small shape: 12 layers, d_model 768, 12 heads (head_dim 64), vocab 50304,
    causal; seq 1k..8k at equal tokens per step (batch = tokens // seq).
  BERT-large shape: 24 layers, d_model 1024, 16 heads (head_dim 64), vocab 30528,
    bidirectional; seq 512.
  Longest sequence: GPT-2 small at batch 1, doubling the length until the step's
    compiled memory no longer fits the GPU (then one real step at the longest fit).

One full AdamW training step (forward, backward, update) in bf16 compute with
float32 parameters, jitted with donated state; every attention in the same
process. Step time is the median of repeats, the attentions of a shape taking
turns repeat by repeat; memory is the compiled step's temporary bytes
(`memory_analysis()`), arguments (params + optimizer state + tokens) listed
apart. The XLA_FLAGS of the run go into its rows and table: XLA
leaves custom calls (jax_flash's kernels) out of its command buffers unless
`--xla_gpu_enable_command_buffer=+CUSTOM_CALL` is among them (README,
Performance).

  python benchmarks/bench_e2e.py --out-dir results
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_attention import Timing, _default_name, _device_memory_bytes, _error_text, time_calls  # noqa: E402
from models import ATTENTION, Config, Transformer, next_token_loss  # noqa: E402

GPT2_SMALL = dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, causal=True)
BERT_LARGE = dict(vocab_size=30528, d_model=1024, n_layers=24, n_heads=16, causal=False)


def train_step_fn(model):
  optimizer = optax.adamw(1e-4)

  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(next_token_loss)(params, model, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return optimizer, step


_PARAMS = {}


def initial_params(shape: dict, max_len: int):
  """Parameters of a shape, made once: every attention has the same parameter tree."""
  key = (tuple(sorted(shape.items())), max_len)
  if key not in _PARAMS:
    _PARAMS.clear()  # one model's parameters on the device at a time
    model = Transformer(Config(max_len=max_len, dtype="bfloat16", **shape))
    _PARAMS[key] = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
  return _PARAMS[key]


_RUN_ENV = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE")


def step_tokens(shape: dict, batch: int, seq: int):
  return jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, shape["vocab_size"])


def compile_step(model_name: str, shape: dict, attention: str, batch: int, seq: int,
                 run: bool = True, max_len: int | None = None):
  """The step's row (compile time, memory) and a function that runs one step on
  its own copy of the training state (None where the step cannot run)."""
  row = dict(model=model_name, attention=attention, batch=batch, seq=seq,
             tokens=batch * seq, xla_flags=os.environ.get("XLA_FLAGS", "").strip(),
             env={k: os.environ[k] for k in _RUN_ENV[1:] if k in os.environ})
  try:
    cfg = Config(max_len=max_len or seq, attention=attention, dtype="bfloat16", **shape)
    model = Transformer(cfg)
    tokens = step_tokens(shape, batch, seq)
    # Donation consumes the state: each step function gets its own copy.
    params = jax.tree.map(jnp.copy, initial_params(shape, cfg.max_len))
    optimizer, step = train_step_fn(model)
    opt_state = jax.jit(optimizer.init)(params)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens).compile()
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    stats = compiled.memory_analysis()
    row["temp_bytes"] = int(stats.temp_size_in_bytes)
    row["arg_bytes"] = int(stats.argument_size_in_bytes)
    limit = _device_memory_bytes()
    if limit and row["temp_bytes"] + row["arg_bytes"] > limit:
      row["error"] = (f"RESOURCE_EXHAUSTED: step needs "
                      f"{(row['temp_bytes'] + row['arg_bytes']) / 2**30:.1f} GiB, the device "
                      f"has {limit / 2**30:.1f} GiB (not run)")
      return row, None
    if not run:
      return row, None
    state = [params, opt_state]

    def one_step(tokens):
      state[0], state[1], loss = compiled(state[0], state[1], tokens)
      return loss

    jax.block_until_ready(one_step(tokens))  # a failure to run is the attention's error
    return row, one_step
  except Exception as e:  # noqa: BLE001 - every failure is a result to record
    row["error"] = _error_text(e)
    return row, None


def measure(model_name: str, shape: dict, attentions: list[str], batch: int, seq: int,
            timing: Timing, max_len: int | None = None) -> list[dict]:
  """One row per attention. The steps that run take turns, one repeat each
  (time_calls), so that drift in the GPU's clocks reaches all of them alike."""
  steps = [compile_step(model_name, shape, a, batch, seq, max_len=max_len) for a in attentions]
  runnable = [(row, fn) for row, fn in steps if fn is not None]
  tokens = step_tokens(shape, batch, seq)
  try:
    seconds = time_calls([fn for _, fn in runnable], (tokens,), timing)
    for (row, fn), sec in zip(runnable, seconds):
      row["ms"] = sec * 1e3
      row["tokens_per_s"] = batch * seq / sec
      row["loss"] = float(fn(tokens))
  except Exception as e:  # noqa: BLE001 - every failure is a result to record
    for row, _ in runnable:
      row["error"] = _error_text(e)
  return [row for row, _ in steps]


def _cell(row, key, fmt):
  if "error" in row:
    return "OOM" if "RESOURCE_EXHAUSTED" in row["error"] else "err"
  return fmt.format(row[key]) if key in row else "-"


def _gib(row):
  if "temp_bytes" in row and "error" not in row:
    return f"{row['temp_bytes'] / 2**30:.1f}"
  return _cell(row, "temp_bytes", "")


def markdown(rows, command: str, seconds: float, device: str | None = None,
             jax_version: str | None = jax.__version__) -> str:
  device = device or jax.devices()[0].device_kind
  out = [f"# End-to-end training step: {device}, {time.strftime('%Y-%m-%d')}", "",
         f"Command: `{command}`  ",
         (f"jax {jax_version}; " if jax_version else "")
         + "bf16 compute, fp32 params, AdamW; ms = median step time; "
         "temp GiB = compiled temporary memory of the step (params and optimizer state, "
         "the same for all, excluded)." + (f" Took {seconds:.0f} s." if seconds else ""), ""]
  flags = sorted({r.get("xla_flags", "") for r in rows})
  out[-1:-1] = ["", "XLA_FLAGS: " + " / ".join(f"`{f}`" if f else "(none)" for f in flags)]
  env = sorted({f"{k}={v}" for r in rows for k, v in r.get("env", {}).items()})
  if env:
    out[-1:-1] = ["", "Environment: " + ", ".join(f"`{e}`" for e in env)]
  steps = [r for r in rows if r["model"] != "gpt2-small-longest"]
  keys = sorted({(r["model"], r["seq"], r["batch"]) for r in steps},
                key=lambda k: (k[0] != "gpt2-small", k[1]))
  by = {(r["model"], r["seq"], r["batch"], r["attention"]): r for r in steps}
  out.append("| model | seq | batch | " + " | ".join(f"{a} ms" for a in ATTENTION)
             + " | jax_flash tok/s | vs xla | vs cudnn | "
             + " | ".join(f"{a} temp GiB" for a in ATTENTION) + " |")
  out.append("|" + "---|" * (6 + 2 * len(ATTENTION)))
  for model, seq, batch in keys:
    r = {a: by.get((model, seq, batch, a), {"error": "missing"}) for a in ATTENTION}
    speed = lambda a: (f"{r[a]['ms'] / r['jax_flash']['ms']:.2f}x"
                       if "ms" in r[a] and "ms" in r["jax_flash"] else "-")
    out.append(f"| {model} | {seq} | {batch} | "
               + " | ".join(_cell(r[a], "ms", "{:.1f}") for a in ATTENTION)
               + f" | {_cell(r['jax_flash'], 'tokens_per_s', '{:,.0f}')} | {speed('xla')} | "
               f"{speed('cudnn')} | "
               + " | ".join(_gib(r[a]) for a in ATTENTION)
               + " |")
  longest = [r for r in rows if r["model"] == "gpt2-small-longest"]
  if longest:
    out += ["", "Longest GPT-2-small sequence at batch 1 whose training step's compiled "
            "memory fits the GPU's allotment (doubling the length until it does not):", ""]
    for a in sorted({r["attention"] for r in longest}, key=ATTENTION.index):
      fits = [r for r in longest if r["attention"] == a and "error" not in r]
      ran = [r for r in fits if "ms" in r]
      best = max(fits, key=lambda r: r["seq"]) if fits else None
      text = (f"{best['seq']} tokens ({(best['temp_bytes'] + best['arg_bytes']) / 2**30:.1f} GiB"
              + (f", step {ran[-1]['ms']:.0f} ms" if ran else "") + ")") if best else "none tried fit"
      out.append(f"- {a}: {text}")
  return "\n".join(out) + "\n"


def plot(rows, path: pathlib.Path, title: str):
  """GPT-2-small step time and temporary memory against sequence length."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
  for a in ATTENTION:
    pts = sorted((r["seq"], r) for r in rows if r["model"] == "gpt2-small" and r["attention"] == a)
    timed = [(sq, r["ms"]) for sq, r in pts if "ms" in r]
    mem = [(sq, r["temp_bytes"] / 2**30) for sq, r in pts if "temp_bytes" in r]
    if timed:
      ax_t.plot(*zip(*timed), marker="o", label=a)
    if mem:
      ax_m.plot(*zip(*mem), marker="o", label=a)
  for ax, label in ((ax_t, "training step (ms)"), (ax_m, "compiled temporary memory (GiB)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens per step fixed)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seqs", default="1024,2048,4096,8192")
  p.add_argument("--tokens", type=int, default=16384, help="tokens per step (GPT-2 sweep)")
  p.add_argument("--bert-batch", type=int, default=32)
  p.add_argument("--longest", default="8192,16384,32768,65536,131072",
                 help="batch-1 GPT-2 lengths to try for the longest that fits ('' skips)")
  p.add_argument("--attention", default=",".join(ATTENTION))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("."))
  p.add_argument("--name", default=None)
  p.add_argument("--from-jsonl", nargs="+", type=pathlib.Path,
                 help="measure nothing: write the table and plot of earlier runs' rows")
  p.add_argument("--device-kind", default=None, help="with --from-jsonl: the GPU's name")
  args = p.parse_args(argv)
  if args.from_jsonl:
    rows = [json.loads(line) for f in args.from_jsonl for line in f.read_text().splitlines()
            if line.strip()]
    name = "e2e-" + (args.name or "combined")
    sources = ", ".join(f.name for f in args.from_jsonl)
    md = markdown(rows, f"rows of {sources}", 0.0, args.device_kind, jax_version=None)
    (args.out_dir / f"{name}.md").write_text(md)
    plot(rows, args.out_dir / f"{name}.png", f"GPT-2 small training step, {args.device_kind}")
    print(md)
    return
  attentions = [a for a in args.attention.split(",") if a]
  timing = Timing(repeats=args.repeats, min_repeat_s=0.0, max_iters=1)
  name = "e2e-" + (args.name or _default_name())
  args.out_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  t_start = time.perf_counter()
  log = args.out_dir / f"{name}.jsonl"
  log.write_text("")

  def record(row):
    rows.append(row)
    print(json.dumps(row), flush=True)
    with log.open("a") as f:
      f.write(json.dumps(row) + "\n")

  seqs = [int(s) for s in args.seqs.split(",") if s]
  for seq in seqs:
    for row in measure("gpt2-small", GPT2_SMALL, attentions, args.tokens // seq, seq, timing,
                       max_len=max(seqs)):
      record(row)
  if args.bert_batch:
    for row in measure("bert-large", BERT_LARGE, attentions, args.bert_batch, 512, timing):
      record(row)
  for a in attentions:
    fitted = None
    for seq in (int(s) for s in args.longest.split(",") if s):
      row, _ = compile_step("gpt2-small-longest", GPT2_SMALL, a, 1, seq, run=False)
      record(row)
      if "error" in row:
        break
      fitted = seq
    if fitted is not None:
      record(*measure("gpt2-small-longest", GPT2_SMALL, [a], 1, fitted,
                      Timing(repeats=1, min_repeat_s=0.0, max_iters=1)))
  seconds = time.perf_counter() - t_start
  command = "python benchmarks/bench_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:])
  md = markdown(rows, command.strip(), seconds)
  (args.out_dir / f"{name}.md").write_text(md)
  try:
    plot(rows, args.out_dir / f"{name}.png",
         f"GPT-2 small training step, {jax.devices()[0].device_kind}")
  except ImportError:
    print("matplotlib not installed: no plot (rerun with --from-jsonl where it is)")
  print(md)


if __name__ == "__main__":
  main()
