"""absl flags shared by the experiment launchers: --overwrite and multi-host start-up.

    # Cloud TPU pod slice: the same command on every host (JAX finds the coordinator)
    python experiments/quantize.py --distributed --outdir=gs://.../run
    # several GPU nodes, by hand: one process per node
    python experiments/quantize.py --distributed --coordinator_address=node0:1234 \\
        --num_processes=2 --process_id=$RANK
"""

from typing import Callable

from absl import flags, logging

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


def job(run: Callable[[], object]) -> Callable:
  """The `main(argv)` of a launcher: quiet library logging (progress is printed), start
  multi-host JAX when asked, then `run()`."""

  def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # keep orbax's INFO lines out of the progress
    maybe_initialize_distributed()
    run()

  return main
