"""The benchmark's reporting, from rows like a GPU run writes (no GPU needed)."""

import json
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest

ROOT = pathlib.Path(__file__).resolve().parent.parent


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


if __name__ == "__main__":
  absltest.main()
