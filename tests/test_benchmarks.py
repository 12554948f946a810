"""The benchmark's reporting, from rows like a GPU run writes (no GPU needed)."""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from unittest import mock

import jax
from absl.testing import absltest
from jax.profiler import ProfileData

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_attention  # noqa: E402
import bench_ring  # noqa: E402
import kernel_times  # noqa: E402


def _rows():
  rows = []
  for mode in ("fwd", "fwdbwd"):
    for d in (64, 128):
      for s in (2048, 4096):
        for causal in (False, True):
          for peer, tflops in (("jax_flash", 400.0 + s / 1024), ("cudnn", 420.0)):
            rows.append(dict(peer=peer, mode=mode, causal=causal, d=d, s=s, b=1, h=1,
                             ms=1.0, tflops=tflops, temp_bytes=2**20))
  return rows


def _smoke_run(script: str, prefix: str, env=None):
  """The rows (.jsonl) and table (.md) of a --quick run of a benchmark script on CPU."""
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--allow-cpu",
                    "--quick", "--out-dir", tmp, "--name", "smoke"],
                   check=True, cwd=ROOT, timeout=600, capture_output=True, env=env)
    out = pathlib.Path(tmp) / f"{prefix}-smoke"
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    return rows, out.with_suffix(".md").read_text()


class RatioPlotTest(absltest.TestCase):

  def test_plot_from_an_earlier_run_writes_a_png(self):
    with tempfile.TemporaryDirectory() as tmp:
      jsonl = pathlib.Path(tmp) / "run.jsonl"
      jsonl.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
      subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"),
                      "--plot-from", str(jsonl)], check=True, cwd=ROOT, timeout=300)
      png = jsonl.with_suffix(".png")
      self.assertTrue(png.exists())
      self.assertEqual(png.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
      self.assertGreater(png.stat().st_size, 10_000)


class SummaryTest(absltest.TestCase):

  def test_the_forward_is_held_against_the_matmul_rate_of_the_same_run(self):
    rows = _rows() + [dict(peer="jax_flash", mode="fwd", causal=False, d=128, s=16384, b=1,
                           h=16, ms=1.0, tflops=636.0, temp_bytes=2**20)]
    lines = bench_attention.summary_lines(rows, matmul_tflops=795.0)
    self.assertIn("jax_flash d128 s16384 full fwd: 636 TFLOP/s, 0.800 of the matmul rate "
                  "(795 TFLOP/s)", lines)
    self.assertFalse(any("matmul" in line for line in bench_attention.summary_lines(rows)))

  def test_the_forward_is_held_against_a_matmul_timed_beside_it(self):
    cell = dict(mode="fwd", causal=False, d=128, s=16384, b=1, h=16)
    rows = _rows() + [dict(cell, peer="jax_flash", ms=1.0, tflops=610.0),
                      dict(cell, peer="matmul", ms=1.0, tflops=762.5)]
    lines = bench_attention.summary_lines(rows, matmul_tflops=798.0)
    self.assertIn("jax_flash d128 s16384 full fwd: 610 TFLOP/s, 0.764 of the matmul rate "
                  "(798 TFLOP/s)", lines)
    self.assertIn("jax_flash d128 s16384 full fwd: 610 TFLOP/s, 0.800 of the matmul rate "
                  "taken beside it, repeat by repeat (762 TFLOP/s)", lines)
    # The matmul row is no peer of the table.
    self.assertNotIn("matmul", bench_attention.markdown_table(rows, ["jax_flash", "cudnn"]))


class VariantsBenchmarkTest(absltest.TestCase):

  def test_smoke_run_on_cpu_writes_every_section(self):
    rows, table = _smoke_run("bench_variants.py", "variants")
    timed = {(r["section"], r["label"], r["peer"]) for r in rows if "ms" in r}
    for row in (("cost", "window", "jax_flash"), ("cost", "dropout", "jax_flash"),
                ("scaling", "seq 256", "jax_flash"),
                ("scaling", "seq 256", "jax_flash_packed"),
                ("packing", "4 x 64", "jax_flash_packed"),
                ("packing", "4 x 64", "jax_flash_apart")):
      self.assertIn(row, timed)
    for title in ("What each variant costs", "as the sequence grows",
                  "Packed documents against the same documents apart"):
      self.assertIn(title, table)


class BlockSparseBenchmarkTest(absltest.TestCase):

  def test_smoke_run_on_cpu_times_every_pattern_and_fits_the_overhead(self):
    rows, table = _smoke_run("bench_block_sparse.py", "block-sparse")
    timed = {(r["mode"], r["pattern"]) for r in rows if "ms" in r}
    for mode in ("fwd", "fwdbwd"):
      for pattern in ("dense", "all on", "butterfly", "local", "random"):
        self.assertIn((mode, pattern), timed)
    self.assertIn("overhead", table)


class KernelTimesTest(absltest.TestCase):

  def test_kernel_times_sum_the_streams_of_one_gpu_per_step(self):
    event = "events {{ metadata_id: {} offset_ps: {} duration_ps: {} }}"
    stream = " ".join(event.format(m, t, d) for m, t, d in
                      ((1, 0, 3_000_000), (2, 4_000_000, 500_000), (1, 5_000_000, 1_000_000)))
    text = f"""
      planes {{ id: 1 name: "/device:GPU:0"
        lines {{ id: 1 name: "Stream #13(compute)" {stream} }}
        lines {{ id: 2 name: "XLA Ops" {event.format(1, 0, 9_000_000)} }}
        event_metadata {{ key: 1 value {{ id: 1 name: "flash_fwd_kernel" }} }}
        event_metadata {{ key: 2 value {{ id: 2 name: "Memset 0" }} }} }}
      planes {{ id: 2 name: "/device:GPU:1"
        lines {{ id: 1 name: "Stream #13(compute)" {event.format(1, 0, 7_000_000)} }}
        event_metadata {{ key: 1 value {{ id: 1 name: "flash_fwd_kernel" }} }} }}"""
    profile = ProfileData.from_serialized_xspace(
        ProfileData.text_proto_to_serialized_xspace(text))
    self.assertEqual(kernel_times.kernel_times(profile, steps=2),
                     {"flash_fwd_kernel": (2.0, 1.0), "Memset 0": (0.25, 0.5)})

  def test_transfers_beside_attention_is_the_share_of_their_time_under_a_kernel(self):
    # On GPU 0, attention kernels on one stream at [0, 4) and [3, 6) us and
    # [10, 11) us, transfers on another at [5, 7) and [9, 10.5) us: 1 + 0.5 of
    # their 3.5 us have a jax_flash kernel beside them. GPU 1 is not counted.
    event = "events {{ metadata_id: {} offset_ps: {} duration_ps: {} }}"
    us = 1_000_000
    compute = " ".join(event.format(1, a * us, b * us) for a, b in ((0, 4), (3, 3), (10, 1)))
    comm = " ".join(event.format(2, int(a * us), int(b * us)) for a, b in ((5, 2), (9, 1.5)))
    text = f"""
      planes {{ id: 1 name: "/device:GPU:0"
        lines {{ id: 1 name: "Stream #13(compute)" {compute} }}
        lines {{ id: 2 name: "Stream #20(nccl)" {comm} }}
        lines {{ id: 3 name: "XLA Ops" {event.format(2, 0, 20 * us)} }}
        event_metadata {{ key: 1 value {{ id: 1 name: "void jax_flash::sm90::flash_fwd" }} }}
        event_metadata {{ key: 2 value {{ id: 2 name: "ncclDevKernel_SendRecv" }} }} }}
      planes {{ id: 2 name: "/device:GPU:1"
        lines {{ id: 1 name: "Stream #20(nccl)" {event.format(1, 0, 9 * us)} }}
        event_metadata {{ key: 1 value {{ id: 1 name: "ncclDevKernel_SendRecv" }} }} }}"""
    profile = ProfileData.from_serialized_xspace(
        ProfileData.text_proto_to_serialized_xspace(text))
    per_step_us, share = kernel_times.transfers_beside_attention(profile, steps=1)
    self.assertAlmostEqual(per_step_us, 3.5)
    self.assertAlmostEqual(share, 1.5 / 3.5)
    self.assertIsNone(kernel_times.transfers_beside_attention(profile, steps=1, device=2))

  def test_smoke_run_on_cpu_traces_every_call(self):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_times.py"),
                          "--allow-cpu", "--seq", "256", "--head-dim", "16", "--tokens", "256",
                          "--steps", "1"],
                         check=True, cwd=ROOT, timeout=600, capture_output=True, text=True)
    for call in ("dense:", "all on:", "random 0.25 (blocks on: "):
      self.assertIn(call, out.stdout)


class RingBenchmarkTest(absltest.TestCase):

  def test_smoke_run_on_simulated_devices_times_every_mode(self):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    rows, _ = _smoke_run("bench_ring.py", "ring", env=env)
    self.assertEqual([r for r in rows if "error" in r], [])
    self.assertEqual({(r["devices"], r["mode"]) for r in rows if r["seq"] == 128},
                     {(1, "one device")} | {(n, m) for n in (1, 2, 4)
                                            for m in ("ring", "allgather")})

  def _longest_with_limit_and_runs(self, ran):
    """bench_ring.longest on one device, its memory limit the analysed bytes of
    8 units (16384 tokens), and steps that run when ran(seq) holds (else raise
    what ran(seq) returns)."""
    args = argparse.Namespace(batch=1, heads=2, head_dim=16, seqs=[2048], longest_run=True)
    _, forward_backward, _ = bench_ring.programs(1, None)
    limit = bench_ring._bytes_per_device(jax.jit(forward_backward).lower(
        *bench_ring._specs((1, 16384, 2, 16), None)).compile())
    def run_once(compiled, arrays):
      outcome = ran(arrays[0].shape[1])
      if outcome is not True:
        raise outcome
      return 0.5
    with mock.patch.object(bench_ring, "_device_memory_bytes", return_value=limit), \
         mock.patch.object(bench_ring, "_run_once", side_effect=run_once):
      return bench_ring.longest(1, args)

  def test_longest_run_steps_down_from_the_analysed_length_until_a_step_runs(self):
    row = self._longest_with_limit_and_runs(
        lambda seq: seq <= 12288 or RuntimeError("RESOURCE_EXHAUSTED: Out of memory"))
    self.assertEqual((row["seq_by_analysis"], row["seq"], row["fwdbwd_ms"]),
                     (16384, 12288, 500.0))
    self.assertNotIn("error", row)
    self.assertTrue(row["first_miss"].endswith("GiB per device"), row["first_miss"])

  def test_longest_run_refuses_a_growing_memory_pool(self):
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ring.py"),
                           "--allow-cpu", "--longest", "--longest-run",
                           "--out-dir", tempfile.gettempdir()],
                          cwd=ROOT, timeout=300, capture_output=True, text=True, env=env)
    self.assertEqual(done.returncode, 2)
    self.assertIn("--longest-run needs JAX's preallocated memory pool", done.stderr)

  def test_device_counts_beyond_the_devices_present_are_refused(self):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ring.py"),
                           "--allow-cpu", "--quick", "--devices", "2,8",
                           "--out-dir", tempfile.gettempdir()],
                          cwd=ROOT, timeout=300, capture_output=True, text=True, env=env)
    self.assertEqual(done.returncode, 2)
    self.assertIn("--devices [2, 8]: this process sees 4 devices", done.stderr)

  def test_longest_run_stops_at_an_error_other_than_memory(self):
    row = self._longest_with_limit_and_runs(lambda seq: ValueError("bad"))
    self.assertEqual((row["seq"], row["error"]), (16384, "ValueError: bad"))
    self.assertNotIn("fwdbwd_ms", row)


if __name__ == "__main__":
  absltest.main()
