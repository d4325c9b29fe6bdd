"""What every experiment launcher shares: --overwrite, multi-host start-up, config flags
that name a mistyped field, and errors in one short message.

    if __name__ == "__main__":
      launch.main(run)      # run() takes no arguments and reads the flags

    # Cloud TPU pod slice: the same command on every host (JAX finds the coordinator)
    python experiments/quantize.py --distributed --outdir=gs://.../run
    # several GPU nodes, by hand: one process per node
    python experiments/quantize.py --distributed --coordinator_address=node0:1234 \\
        --num_processes=2 --process_id=$RANK
"""

import os
import re
import sys
from typing import Callable, NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from tac_jax import parallel

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() before anything else (multi-host TPU pod slices, "
    "several GPU nodes). Not needed for one host, however many devices it has.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0. Leave empty on Cloud TPU, SLURM and Open MPI (auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1.")
OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "Replace an --outdir that already holds results (as a whole, once the new run is "
    "complete). Without it such an --outdir is refused before any work starts.")
_LOCAL_DEVICES = flags.DEFINE_list(
    "local_device_ids", None, "Device ids this process uses (e.g. one GPU per process: 0).")


def maybe_initialize_distributed() -> bool:
  """Initializes multi-host JAX when `--distributed` is set; returns whether it did."""
  if not _DISTRIBUTED.value:
    given = [f.name for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _LOCAL_DEVICES)
             if f.value is not None]
    if given:
      raise flags.ValidationError(f"--{', --'.join(given)} given without --distributed; add "
                                  "--distributed to start a multi-host run.")
    return False
  local = [int(d) for d in _LOCAL_DEVICES.value] if _LOCAL_DEVICES.value else None
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  local)
  return True


# What a user can cause and fix (bad flags, config values, files): one message, no traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, flags.Error, SyntaxError)
TRACEBACK_ENV = "TAC_JAX_TRACEBACK"


def fail(error: BaseException) -> NoReturn:
  """Exits with status 1 after printing `error` as `error: <message>` (no traceback unless
  the environment sets TAC_JAX_TRACEBACK=1, which re-raises it)."""
  if os.environ.get(TRACEBACK_ENV) == "1":
    raise error
  text = str(error).strip() or type(error).__name__
  if isinstance(error, SyntaxError) and error.filename:
    text = f"{error.filename}, line {error.lineno}: {error.msg}"
  sys.stderr.write(f"error: {text}\n(set {TRACEBACK_ENV}=1 to see the traceback)\n")
  sys.exit(1)


def _unknown_field(error: BaseException, argv) -> ValueError:
  """ml_collections' error for a `--config.<field>` override naming no field, as one line
  that names the flag and the closest valid field."""
  text = error
  while isinstance(text, BaseException) and text.args:   # AttributeError(KeyError(str))
    text = text.args[0]
  lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
  field = lines[0].strip("'\"") if lines else "?"
  hint = f" ({lines[1][0].lower()}{lines[1][1:]})" if len(lines) > 1 else ""
  flag = next((a.split("=")[0] for a in argv if re.search(rf"\.{re.escape(field)}(=|$)",
                                                           a.split("=")[0])), f"--config.{field}")
  return ValueError(f"{flag}: the config has no field {field!r}{hint}.")


def parse_flags(argv):
  """absl's flag parser with bad flags and broken config files reported by `fail`."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:   # an override of a field the --config file lacks
    fail(_unknown_field(e, argv))
  except USER_ERRORS as e:
    fail(e)


class ConfigFlag:
  """A `--config` file flag whose `.value` is loaded at once: a config file that cannot be
  loaded is a one-line ValueError naming the flag and the file's problem."""

  def __init__(self, holder, name: str):
    self._holder, self._name = holder, name

  @property
  def value(self):
    try:
      config = self._holder.value
      config.keys()   # the file is loaded lazily: make a failure to load show here
    except OSError as e:
      errno = re.findall(r"\[Errno \d+\][^\n]*", str(e))
      why = errno[-1].strip() if errno else str(e).splitlines()[0]
      raise ValueError(f"--{self._name}: cannot load the config file ({why}).") from None
    return config


def define_config(name: str, default: str, help_string: str) -> ConfigFlag:
  """`config_flags.DEFINE_config_file` with the errors of `ConfigFlag`; an override of a
  field the config lacks (found here: ml_collections reads sys.argv when the flag is
  defined) ends the program with the closest valid field named."""
  try:
    holder = config_flags.DEFINE_config_file(name, default, help_string)
  except (AttributeError, KeyError) as e:
    fail(_unknown_field(e, sys.argv))
  return ConfigFlag(holder, name)


def job(run: Callable[[], object]) -> Callable:
  """The `main(argv)` of a launcher: quiet library logging (progress is printed), start
  multi-host JAX when asked, then `run()`; user errors end in one message (`fail`)."""

  def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # keep orbax's INFO lines out of the progress
    try:
      maybe_initialize_distributed()
      run()
    except USER_ERRORS as e:
      fail(e)

  return main


def main(run: Callable[[], object]) -> None:
  """Runs a launcher: `app.run` with `parse_flags` and `job(run)`."""
  app.run(job(run), flags_parser=parse_flags)
