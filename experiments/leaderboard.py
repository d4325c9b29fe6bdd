"""The leaderboard of compensation methods, generated from main-job result folders: every
method's PSNR and FD vs float per (model, setting, PTQ preset), with paired bootstrap
intervals of the difference to the best, calibration time and extra network calls, and
the default's verdict row by row (tac_jax/app/leaderboard.py).

  python experiments/leaderboard.py --dirs=docs/results,docs/results_gray28 --out=docs/leaderboard.md
"""

import sys

from absl import app, flags

from tac_jax import files
from tac_jax.app import leaderboard

_DIRS = flags.DEFINE_list("dirs", ["docs/results"], "main-job result folders")
_OUT = flags.DEFINE_string("out", "", "write the page here (default: print it)")
_METHOD = flags.DEFINE_string("method", "tcec_safe", "the method whose verdict is given")
_RESAMPLES = flags.DEFINE_integer("resamples", 1000, "paired bootstrap resamples of the seeds")
_CONFIDENCE = flags.DEFINE_float("confidence", 0.9, "interval coverage")


def main(argv):
  del argv
  rows = [r for d in _DIRS.value for r in leaderboard.rows_of(d, _RESAMPLES.value,
                                                              _CONFIDENCE.value)]
  command = "python experiments/leaderboard.py " + " ".join(sys.argv[1:])
  text = leaderboard.markdown(rows, _METHOD.value, command, _CONFIDENCE.value)
  if _OUT.value:
    files.write_text_atomic(_OUT.value, text)
  print(text)


if __name__ == "__main__":
  app.run(main)
