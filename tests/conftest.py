import os
import shutil
import tempfile

import pytest

# tests/ is on sys.path (pytest's rootdir conftest): the helpers are a plain module.
from configs_loader import ROOT, launcher_cmd

# One XLA compilation cache for the whole test session, this process and every launcher
# subprocess (they inherit the environment): many tests compile the same tiny programs
# (the tiny UNet's init, samplers, train step), and on 2 CPU cores compiling is most of
# their time. A fresh directory per session (removed at exit), so every run compiles
# everything once: no state carried between runs. Set before jax is imported.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="tac_jax_test_xla_cache_")
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  import atexit  # pylint: disable=g-import-not-at-top
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
elif os.environ.get("PYTEST_XDIST_WORKER") and os.path.basename(
    os.environ["JAX_COMPILATION_CACHE_DIR"]).startswith("tac_jax_test_xla_cache_"):
  # An xdist worker started by the process above: a subfolder of its own, so that two
  # workers never read an entry the other is still writing.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      os.environ["JAX_COMPILATION_CACHE_DIR"], os.environ["PYTEST_XDIST_WORKER"])


# Tests compile many small programs and run each a few times: XLA's CPU backend compiles
# faster without LLVM optimisation (same HLO, same values up to float rounding; 4x for the
# UNet init, ~20 % for a train step), and compiling is most of the suite's time on 2
# cores. Subprocesses inherit it (`configs_loader.xla_env`).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  """tiny_model_dir(sample_size) -> a saved model directory of a tiny random UNet."""
  import jax  # pylint: disable=import-outside-toplevel
  from tac_jax.models import checkpoint  # pylint: disable=import-outside-toplevel
  from tac_jax.models import UNetConfig, init_unet  # pylint: disable=import-outside-toplevel
  made = {}

  def make(sample_size: int = 8) -> str:
    if sample_size not in made:
      cfg = UNetConfig(sample_size=sample_size, block_out_channels=(8, 16), attention_levels=(1,),
                       attention_head_dim=16, norm_num_groups=4)
      _, params = init_unet(cfg, jax.random.key(0))
      d = str(tmp_path_factory.mktemp(f"model{sample_size}"))
      checkpoint.save_model(d, params, {"model": cfg.to_dict(), "schedule": {
          "name": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}})
      made[sample_size] = d
    return made[sample_size]

  return make


# One tiny end-to-end run of each launcher, shared by every test that reads their outputs
# (the main job and the sweep on the same model, seed and sampler, so their numbers can be
# compared with each other); those tests live in tests/test_launchers.py.
TINY_MAIN_FLAGS = ("--config.num_steps=3", "--config.num_calib=8", "--config.num_eval=8",
                   "--config.settings=W4A4", "--config.ptq=minmax",
                   "--config.methods=none,tcec,tcec_safe,toy_offset", "--config.timing_repeats=0",
                   "--config.plugins=tests.toy_compensator")
TINY_SWEEP_FLAGS = ("--config.seeds=0", "--config.settings=W4A4",
                    "--config.methods=none,tcec,toy_offset", "--config.plugins=tests.toy_compensator",
                    "--config.samplers=ddim2,ddim3", "--config.ref_sampler=ddim3",
                    "--config.ptq_options=minmax,minmax_tg2", "--config.num_calib=8",
                    "--config.num_eval=8", "--config.num_fd=16", "--config.fd_methods=none,tcec",
                    "--config.ablation_settings=W4A4", "--config.ablations=tcec,ehat",
                    "--config.calib_sizes=4")


SHARED_RUNS_FILE = "test_launchers.py"
# A generous bound, not a speed check (on 2 idle cores the runs take ~3 min): under load
# the suite should slow down, not fail.
RUN_TIMEOUT_S = 3600


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Every test that reads the shared tiny runs lives in tests/test_launchers.py: with the
  suite spread over workers by file (`-n auto --dist loadfile`, pyproject.toml) the runs
  happen once per session, not once per worker. Those tests go first, as the longest
  chain of work (`--no-loadscope-reorder` keeps this order)."""
  stray = [i.nodeid for i in items if "tiny_runs" in getattr(i, "fixturenames", ())
           and os.path.basename(str(i.path)) != SHARED_RUNS_FILE]
  if stray:
    raise pytest.UsageError(f"tests using the tiny_runs fixture belong in tests/"
                            f"{SHARED_RUNS_FILE} (run once per worker otherwise): {stray}")
  items.sort(key=lambda i: os.path.basename(str(i.path)) != SHARED_RUNS_FILE)


@pytest.fixture(scope="session")
def tiny_runs(tiny_model_dir, tmp_path_factory):
  """{'main': (outdir, CompletedProcess), 'sweep': (...), 'model': dir, 'export': the main
  run's --config.export folder}: both launchers run
  once, side by side (most of their time is single-threaded XLA compilation), on the same
  tiny model."""
  import subprocess  # pylint: disable=import-outside-toplevel
  model = tiny_model_dir(8)
  root = tmp_path_factory.mktemp("tiny_runs")
  out, procs = {"model": model, "export": str(root / "export")}, {}
  for name, config, flags in (("main", "quantize", TINY_MAIN_FLAGS),
                              ("sweep", "sweep", TINY_SWEEP_FLAGS)):
    outdir = str(root / name)
    if name == "main":   # the main run also exports its quantized model
      flags = flags + (f"--config.export={root / 'export'}",)
    cmd = launcher_cmd(name if name == "sweep" else "quantize", config,
                       f"--config.checkpoint={model}", f"--outdir={outdir}", *flags)
    procs[name] = (outdir, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True, cwd=ROOT))
  for name, (outdir, cmd, proc) in procs.items():
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    out[name] = (outdir, subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
  return out
