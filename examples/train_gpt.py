"""Train a small GPT with jax_flash attention, on text every Python install has.

The corpus is the prose of Python's own documentation topics (the `pydoc_data`
module of the standard library), read as bytes: nothing is downloaded. The model
is a pre-LayerNorm decoder (examples/models.py) trained with optax AdamW in a
jitted step. At the end it writes the loss curve, a checkpoint and a sample:

  python examples/train_gpt.py                       # tiny model, CPU-sized (a few minutes)
  python examples/train_gpt.py --config gpu          # a 6-layer model at seq 1024, bf16
  python examples/train_gpt.py --attention xla       # the same with XLA attention (or cudnn)
  python examples/train_gpt.py --resume --steps 600  # continue from the saved checkpoint

Outputs in --workdir (default ./train_gpt_out): loss.png, checkpoint.msgpack,
sample.txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from models import ATTENTION, Config, Transformer, next_token_loss  # noqa: E402

# name: (model dims, training shape)
CONFIGS = {
    "tiny": (dict(d_model=128, n_layers=4, n_heads=4, max_len=256, dtype="float32"),
             dict(batch=32, seq=128, steps=500, lr=2e-3)),
    # The corpus is 500 KB: much past 300 steps of 32k tokens the model memorizes it
    # (on an H100, 2000 steps took the training loss to 0.03 and validation to 2.4).
    "gpu": (dict(d_model=384, n_layers=6, n_heads=6, max_len=1024, dtype="bfloat16"),
            dict(batch=32, seq=1024, steps=300, lr=1e-3)),
}


def load_corpus() -> np.ndarray:
  """Python's documentation topics as one byte array (vocabulary: 256 bytes)."""
  import pydoc_data.topics
  text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def make_train_step(model, optimizer):
  @jax.jit
  def train_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(next_token_loss)(params, model, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return train_step


def make_eval_loss(model):
  return jax.jit(lambda params, tokens: next_token_loss(params, model, tokens))


def random_crops(data: np.ndarray, rng: np.random.Generator, batch: int, length: int):
  starts = rng.integers(0, len(data) - length, size=batch)
  return jnp.asarray(np.stack([data[s:s + length] for s in starts]))


def generate(model, params, prompt: bytes, n_new: int, key, context: int,
             temperature: float = 0.8) -> bytes:
  """Samples n_new bytes after prompt, seeing at most the last `context` bytes (the
  training length). The window is padded on the right, so one compiled forward
  serves every step (causal: the padding is never seen)."""
  max_len = context
  logits_at = jax.jit(lambda p, toks, i: model.apply(p, toks[None])[0, i])
  tokens = list(prompt)
  for _ in range(n_new):
    window = tokens[-max_len:]
    padded = np.zeros(max_len, np.int32)
    padded[:len(window)] = window
    key, sub = jax.random.split(key)
    logits = logits_at(params, jnp.asarray(padded), len(window) - 1)
    tokens.append(int(jax.random.categorical(sub, logits / temperature)))
  return bytes(tokens)


def save_checkpoint(path: pathlib.Path, params, opt_state, step: int, cfg: Config):
  payload = {"params": params, "opt_state": opt_state, "step": step}
  path.write_bytes(flax.serialization.to_bytes(payload))
  path.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))


def restore_checkpoint(path: pathlib.Path, params, opt_state):
  template = {"params": params, "opt_state": opt_state, "step": 0}
  restored = flax.serialization.from_bytes(template, path.read_bytes())
  return restored["params"], restored["opt_state"], int(restored["step"])


def plot_losses(path: pathlib.Path, steps, losses, title: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(steps, losses, lw=1)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (nats/byte)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv=None):
  on_gpu = jax.default_backend() == "gpu"
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", choices=sorted(CONFIGS), default="gpu" if on_gpu else "tiny")
  p.add_argument("--attention", choices=ATTENTION, default="jax_flash")
  p.add_argument("--steps", type=int, help="total steps (default: the config's)")
  p.add_argument("--batch", type=int)
  p.add_argument("--seq", type=int)
  p.add_argument("--lr", type=float)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("train_gpt_out"))
  p.add_argument("--resume", action="store_true", help="continue from workdir's checkpoint")
  p.add_argument("--sample-bytes", type=int, default=300)
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  dims, train = CONFIGS[args.config]
  batch = args.batch or train["batch"]
  seq = args.seq or train["seq"]
  steps = args.steps or train["steps"]
  lr = args.lr or train["lr"]
  cfg = Config(vocab_size=256, causal=True, attention=args.attention,
               **{**dims, "max_len": max(dims["max_len"], seq)})
  model = Transformer(cfg)
  args.workdir.mkdir(parents=True, exist_ok=True)
  ckpt = args.workdir / "checkpoint.msgpack"

  data = load_corpus()
  split = int(0.9 * len(data))
  train_data, val_data = data[:split], data[split:]
  rng = np.random.default_rng(args.seed)

  params = model.init(jax.random.key(args.seed), jnp.zeros((1, seq), jnp.int32))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1),
                                                max(steps, 1), lr / 10)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))
  opt_state = optimizer.init(params)
  start = 0
  if args.resume:
    if not ckpt.exists():
      raise SystemExit(f"--resume: no checkpoint at {ckpt}")
    params, opt_state, start = restore_checkpoint(ckpt, params, opt_state)
    rng = np.random.default_rng(args.seed + start)
  print(f"GPT: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
        f"{n_params / 1e6:.2f}M parameters, attention={cfg.attention}, {cfg.dtype}, "
        f"on {jax.devices()[0].device_kind}; corpus {len(data) / 1e3:.0f} KB of Python docs; "
        f"batch {batch} x seq {seq}, steps {start}..{steps}")

  train_step = make_train_step(model, optimizer)
  eval_loss = make_eval_loss(model)
  history = []
  t0 = time.perf_counter()
  columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
             MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
             TimeRemainingColumn())
  with Progress(*columns, disable=args.quiet) as progress:
    task = progress.add_task("training", total=steps, completed=start, loss="-")
    for step in range(start, steps):
      params, opt_state, loss = train_step(params, opt_state,
                                           random_crops(train_data, rng, batch, seq + 1))
      if step % 10 == 0 or step == steps - 1:
        history.append((step, float(loss)))
        progress.update(task, loss=f"{float(loss):.3f}")
      progress.advance(task)
  seconds = time.perf_counter() - t0
  tokens_per_s = (steps - start) * batch * seq / max(seconds, 1e-9)

  val = float(np.mean([eval_loss(params, random_crops(val_data, rng, batch, seq + 1))
                       for _ in range(4)]))
  save_checkpoint(ckpt, params, opt_state, steps, cfg)
  if history:
    plot_losses(args.workdir / "loss.png", *zip(*history),
                f"{cfg.n_layers}-layer GPT, attention={cfg.attention}")
  prompt = b"The with statement"
  sample = generate(model, params, prompt, args.sample_bytes, jax.random.key(args.seed + 1),
                    context=seq)
  sample_text = sample.decode("utf-8", errors="replace")
  (args.workdir / "sample.txt").write_text(sample_text)
  first = history[0][1] if history else float("nan")
  last = history[-1][1] if history else float("nan")
  print(f"\nloss {first:.3f} -> {last:.3f} (validation {val:.3f}) in {seconds:.0f} s, "
        f"{tokens_per_s:,.0f} tokens/s")
  print(f"wrote {args.workdir / 'loss.png'}, {ckpt}, {args.workdir / 'sample.txt'}")
  print("\nsample:\n" + sample_text)
  return dict(first_loss=first, last_loss=last, val_loss=val, history=history,
              tokens_per_s=tokens_per_s, sample=sample_text)


if __name__ == "__main__":
  main()
