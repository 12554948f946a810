"""The training demo trains: a few steps on CPU lower the loss, and the checkpoint resumes."""

import pathlib
import sys
import tempfile

from absl.testing import absltest
import numpy as np

__import__("pytest").importorskip("flax")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import train_gpt  # noqa: E402


class TrainGptTest(absltest.TestCase):

  def test_loss_falls_and_training_resumes_from_the_checkpoint(self):
    with tempfile.TemporaryDirectory() as workdir:
      common = ["--config", "tiny", "--seq", "64", "--batch", "16", "--quiet",
                "--sample-bytes", "20", "--workdir", workdir]
      first = train_gpt.main(common + ["--steps", "60"])
      self.assertLess(first["last_loss"], first["first_loss"] - 1.5)
      self.assertTrue(np.isfinite(first["val_loss"]))
      for name in ("loss.png", "checkpoint.msgpack", "sample.txt"):
        self.assertGreater((pathlib.Path(workdir) / name).stat().st_size, 0, name)
      self.assertTrue(first["sample"].startswith("The with statement"))
      self.assertGreater(len(first["sample"]), len("The with statement"))

      resumed = train_gpt.main(common + ["--steps", "70", "--resume"])
      self.assertEqual(resumed["history"][0][0], 60)
      # Restored, not re-initialized: the loss continues near where it stopped.
      self.assertLess(resumed["history"][0][1], first["first_loss"] - 1.5)


if __name__ == "__main__":
  absltest.main()
