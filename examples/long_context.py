"""A long-range retrieval task that a small model learns with jax_flash at lengths
where plain XLA attention does not fit on the GPU.

Each example is `length` random "haystack" tokens with one "needle" token (one of
`--needles` reserved tokens) at a uniformly random position, ending in a query
token; the model must name the needle at the last position. Chance is
1/needles; the needle is on average length/2 tokens back.

  python examples/long_context.py                      # GPU: 16k tokens; CPU: 1k
  python examples/long_context.py --length 8192 --steps 300

First the script compiles one training step with XLA attention at the same length
and reports whether its memory fits the device; then it trains with jax_flash on a
curriculum of lengths (256, x4 per stage, up to the target: the retrieval is by
content, so what is learned short carries over), moving to the next length once
the running accuracy reaches 0.9, and prints the accuracy on fresh examples at the
full length.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from models import Config, Transformer  # noqa: E402

HAYSTACK = 64  # ordinary tokens 0..63; needles follow; the query token is last


def make_batch(rng: np.random.Generator, batch: int, length: int, needles: int):
  tokens = rng.integers(0, HAYSTACK, size=(batch, length), dtype=np.int32)
  answers = rng.integers(0, needles, size=batch, dtype=np.int32)
  where = rng.integers(0, length - 1, size=batch)
  tokens[np.arange(batch), where] = HAYSTACK + answers
  tokens[:, -1] = HAYSTACK + needles  # the query
  return jnp.asarray(tokens), jnp.asarray(answers + HAYSTACK)


def last_position_loss(params, model, tokens, answers):
  logits = model.apply(params, tokens)[:, -1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.take_along_axis(logp, answers[:, None], axis=-1).mean()
  return loss, (jnp.argmax(logits, axis=-1) == answers).mean()


def build(cfg: Config, lr: float):
  model = Transformer(cfg)
  optimizer = optax.adam(lr)

  def step(params, opt_state, tokens, answers):
    (loss, acc), grads = jax.value_and_grad(last_position_loss, has_aux=True)(
        params, model, tokens, answers)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc

  return model, optimizer, jax.jit(step, donate_argnums=(0, 1))


def step_memory(cfg: Config, batch: int):
  """Compiled temporary bytes of one training step (nothing is run)."""
  model, optimizer, step = build(cfg, 1e-3)
  tokens = jax.ShapeDtypeStruct((batch, cfg.max_len), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)
  opt_state = jax.eval_shape(optimizer.init, params)
  answers = jax.ShapeDtypeStruct((batch,), jnp.int32)
  stats = step.lower(params, opt_state, tokens, answers).compile().memory_analysis()
  return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes)


def compile_failure(error: Exception) -> str:
  """The line of a compile error that says why (XLA puts out-of-memory deep inside)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  for line in lines:
    found = re.search(r"Out of memory while trying to allocate [\d.]+\s*\w+", line)
    if found:
      return "o" + found.group(0)[1:]
  return lines[0][:200] if lines else type(error).__name__


def device_limit():
  try:
    return jax.devices()[0].memory_stats()["bytes_limit"]
  except Exception:  # noqa: BLE001 - CPU devices have no memory stats
    return None


def main(argv=None) -> dict:
  on_gpu = jax.default_backend() == "gpu"
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--length", type=int, default=16384 if on_gpu else 1024)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=3000 if on_gpu else 400,
                 help="most training steps in all")
  p.add_argument("--needles", type=int, default=16)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--skip-xla-check", action="store_true")
  args = p.parse_args(argv)
  dtype = "bfloat16" if on_gpu else "float32"
  common = dict(vocab_size=HAYSTACK + args.needles + 1, max_len=args.length, d_model=128,
                n_layers=2, n_heads=4, causal=True, dtype=dtype)
  result = {}

  if not args.skip_xla_check:
    limit = device_limit()
    for attention in ("xla", "jax_flash"):
      try:
        need = step_memory(Config(attention=attention, **common), args.batch)
        fits = limit is None or need <= limit
        text = f"{need / 2**30:.2f} GiB" + (f" of {limit / 2**30:.1f} GiB: "
                                              f"{'fits' if fits else 'does not fit'}"
                                              if limit else "")
      except Exception as e:  # noqa: BLE001 - an out-of-memory compile is a result
        need, fits, text = None, False, f"fails to compile: {compile_failure(e)}"
      result[f"{attention}_step_bytes"] = need
      print(f"{attention:9s} attention, length {args.length}, batch {args.batch}: one "
            f"training step needs {text}")

  cfg = Config(attention="jax_flash", **common)
  model, optimizer, step = build(cfg, args.lr)
  rng = np.random.default_rng(0)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  opt_state = optimizer.init(params)
  stages = [n for n in (256, 1024, 4096, 16384, 65536) if n < args.length] + [args.length]
  print(f"training {cfg.n_layers} layers x d_model {cfg.d_model} with jax_flash, "
        f"{args.needles} needles (chance {1 / args.needles:.3f}); lengths {stages}, "
        f"at most {args.steps} steps")
  t0 = time.perf_counter()
  done = 0
  for stage, length in enumerate(stages):
    accs = []
    last = stage == len(stages) - 1
    while done < args.steps:
      params, opt_state, loss, acc = step(params, opt_state,
                                          *make_batch(rng, args.batch, length, args.needles))
      accs.append(float(acc))
      done += 1
      running = np.mean(accs[-25:])
      learned = len(accs) >= 25 and running >= (0.95 if last else 0.9)
      if len(accs) % 25 == 1 or learned:
        print(f"  length {length:6d}  step {done:5d}  loss {float(loss):.3f}  "
              f"accuracy {running:.2f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
      if learned:
        break
  eval_fn = jax.jit(lambda p, t, a: last_position_loss(p, model, t, a)[1])
  held_out = float(np.mean([eval_fn(params, *make_batch(rng, args.batch, args.length,
                                                        args.needles)) for _ in range(8)]))
  print(f"accuracy on {8 * args.batch} fresh examples: {held_out:.2f} "
        f"(chance {1 / args.needles:.3f})")
  result.update(accuracy=held_out, seconds=time.perf_counter() - t0)
  return result


if __name__ == "__main__":
  main()
