"""The benchmark's reporting, from rows like a GPU run writes (no GPU needed)."""

import json
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_attention  # noqa: E402


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


if __name__ == "__main__":
  absltest.main()
