"""The leaderboard of compensation methods, generated from main-job result folders: every
method's PSNR and FD vs float per (model, setting, PTQ preset), with paired bootstrap
intervals of the difference to the best, calibration time and extra network calls, and
the default's verdict row by row (tac_jax/app/leaderboard.py). With --readme, also the
README's headline table (between its `results:begin` / `results:end` markers).

  python experiments/leaderboard.py --out=docs/leaderboard.md --readme=README.md
"""

import sys

from absl import flags

from tac_jax import files
from tac_jax.app import launch, leaderboard

_DIRS = flags.DEFINE_list("dirs", list(leaderboard.PUBLISHED), "main-job result folders")
_OUT = flags.DEFINE_string("out", "", "write the page here (default: print it)")
_README = flags.DEFINE_string("readme", "", "update this README's headline table")
_METHOD = flags.DEFINE_string("method", "tcec_safe", "the method whose verdict is given")
_RESAMPLES = flags.DEFINE_integer("resamples", leaderboard.RESAMPLES,
                                  "paired bootstrap resamples of the seeds")
_CONFIDENCE = flags.DEFINE_float("confidence", 0.9, "interval coverage")


def main():
  command = " ".join(["python experiments/leaderboard.py"] + sys.argv[1:])
  page, table = leaderboard.publish(_DIRS.value, _METHOD.value, _RESAMPLES.value,
                                    _CONFIDENCE.value, command)
  if _OUT.value:
    files.write_text_atomic(_OUT.value, page)
  else:
    print(page)
  if _README.value:
    with open(_README.value) as f:
      text = f.read()
    files.write_text_atomic(_README.value, leaderboard.replace_block(text, table))


if __name__ == "__main__":
  launch.main(main)
