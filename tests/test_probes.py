"""Bad input and faults at the launchers and writers (issue 28): nothing that is not ours is
deleted, nothing is written outside the named folder, stale staging folders are cleaned,
and every user mistake ends in one short message naming the field or file and the fix.
(Library-level checks of schedules, samplers and ranges: tests/test_probes_library.py;
training: tests/test_training.py.)"""

import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from configs_loader import ROOT, launcher_cmd, load_config
from tac_jax import compensation, files
from tac_jax.app import pipeline

NOTES = {"notes.txt": "my notes", "budget.csv": "a,b\n1,2\n"}


def _user_folder(path):
  """A folder of the user's own files (not a tac_jax output)."""
  os.makedirs(path)
  for name, text in NOTES.items():
    with open(os.path.join(path, name), "w") as f:
      f.write(text)
  return str(path)


def _intact(path):
  assert sorted(os.listdir(path)) == sorted(NOTES)
  for name, text in NOTES.items():
    with open(os.path.join(path, name)) as f:
      assert f.read() == text


def _launch(script, *flags, config=None, timeout=300):
  cmd = (launcher_cmd(script, config, *flags) if config else
         [sys.executable, os.path.join(ROOT, "experiments", f"{script}.py"), *flags])
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env={k: v for k, v in os.environ.items() if k != "TAC_JAX_TRACEBACK"})


def _one_message(proc, *needles):
  """Exit status 1, no traceback, a short stderr naming every needle."""
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
  err = proc.stderr.strip()
  assert "Traceback" not in err and len(err.splitlines()) <= 5, err
  for n in needles:
    assert n in err, err
  return err


# ----------------------------------------------------------------------------- data loss

def test_main_job_never_replaces_a_folder_that_is_not_a_run(tiny_model_dir, tmp_path):
  cfg = load_config("quantize")
  cfg.checkpoint = tiny_model_dir(8)
  notes = _user_folder(tmp_path / "notes")
  for overwrite in (False, True):   # --overwrite does not make the user's folder ours
    with pytest.raises(FileExistsError, match=r"not tac_jax results \(no manifest.json\)"):
      pipeline.run(cfg, notes, verbose=False, overwrite=overwrite)
  _intact(notes)


def test_writers_refuse_foreign_folders_and_files(tmp_path):
  notes = _user_folder(tmp_path / "notes")
  params = compensation.zero_params(3, 2, jnp.arange(3))
  with pytest.raises(FileExistsError, match="not tac_jax correction params"):
    compensation.save_params(notes, params)
  with pytest.raises(FileExistsError, match="not tac_jax model checkpoint"):
    files.save_checkpoint(notes, {"w": jnp.zeros(2)}, {"model": {}})
  _intact(notes)
  a_file = tmp_path / "a_file"
  a_file.write_text("keep me")
  with pytest.raises(ValueError, match="is a file"):
    compensation.save_params(str(a_file), params)
  assert a_file.read_text() == "keep me"
  # our own folders are replaced as a whole
  ours = str(tmp_path / "params")
  compensation.save_params(ours, params)
  compensation.save_params(ours, params)
  assert compensation.load_params(ours).num_steps == 3


def test_launchers_refuse_foreign_outdirs_before_any_work(tmp_path):
  notes = _user_folder(tmp_path / "notes")
  a_file = tmp_path / "a_file"
  a_file.write_text("keep me")
  proc = _launch("import_diffusers", f"--source={tmp_path / 'nowhere'}", f"--outdir={notes}",
                 "--overwrite")
  _one_message(proc, notes, "model.json")
  proc = _launch("import_diffusers", f"--source={tmp_path / 'nowhere'}", f"--outdir={a_file}")
  _one_message(proc, "is a file")
  proc = _launch("train", f"--export_dir={notes}", f"--workdir={tmp_path / 'w'}", "--overwrite",
                 config="default_model")
  _one_message(proc, notes, "model.json")
  assert not os.path.exists(tmp_path / "w")   # refused before training started
  _intact(notes)
  assert a_file.read_text() == "keep me"


def test_stale_staging_folders_are_cleaned_and_a_parked_version_restored(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  final = str(tmp_path / "run")
  stale = tmp_path / f".run.tmp-{dead.pid}-abc"
  stale.mkdir()
  (stale / "half.json").write_text("{")
  live = tmp_path / f".run.tmp-{os.getpid()}-xyz"      # a write in progress: kept
  live.mkdir()
  parked = tmp_path / f".run.old-{dead.pid}-def"       # killed between the two renames
  parked.mkdir()
  (parked / files.MANIFEST).write_text("{}")
  files.clean_stale(final)
  assert not stale.exists() and live.exists()
  assert os.path.isfile(os.path.join(final, files.MANIFEST))   # the previous run is back
  with files.staged_directory(final, files.MANIFEST) as tmp:
    assert os.path.basename(tmp).startswith(f".run.tmp-{os.getpid()}-")
    with open(os.path.join(tmp, files.MANIFEST), "w") as f:
      f.write("{}")
  leftovers = sorted(d for d in os.listdir(tmp_path) if d.startswith("."))
  assert leftovers == [live.name]


# ----------------------------------------------------------------------------- silent

def test_records_without_checksums_load_only_when_opted_in(tmp_path, monkeypatch):
  d = str(tmp_path / "p")
  compensation.save_params(d, compensation.zero_params(3, 2, jnp.arange(3)))
  record = files.read_json(os.path.join(d, "tcec.json"), "correction params")
  del record["checksums"]
  files.write_json_atomic(os.path.join(d, "tcec.json"), record)
  monkeypatch.delenv(files.UNVERIFIED_ENV, raising=False)
  with pytest.raises(ValueError, match=f"holds no checksums.*{files.UNVERIFIED_ENV}=1"):
    compensation.load_params(d)
  monkeypatch.setenv(files.UNVERIFIED_ENV, "1")
  assert compensation.load_params(d).num_steps == 3


def test_job_fields_are_checked_up_front(tiny_model_dir, tmp_path):
  out = str(tmp_path / "run")
  for field, value, match in (("num_calib", 1, "config.num_calib >= 2"),
                              ("timing_repeats", -3, "config.timing_repeats must be an integer"),
                              ("seed", -1, "config.seed must be an integer >= 0")):
    cfg = load_config("quantize")
    cfg.checkpoint = tiny_model_dir(8)
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
      pipeline.run(cfg, out, verbose=False)
  assert not os.path.exists(out)
  cfg = load_config("quantize")   # config files may hold any type
  cfg.unlock()
  del cfg["num_eval"]
  cfg.num_eval = "8"
  with pytest.raises(ValueError, match="config.num_eval must be an integer >= 1, got '8'"):
    pipeline.run(cfg, out, verbose=False)


# ----------------------------------------------------------------------------- one message

@pytest.mark.parametrize("flags, needles", [
    (("--config.num_calbi=3",), ("num_calbi", 'did you mean "num_calib"')),
    (("--config.num_calib=abc",), ("--config.num_calib", "abc")),
    (("--config=no_such_config.py",), ("--config", "no_such_config.py")),
    (("--config.settings=W3A3",), ("unknown setting", "W3A3")),
    (("--nonflag",), ("nonflag",)),
])
def test_launcher_mistakes_end_in_one_message(flags, needles, tmp_path):
  if "--config=no_such_config.py" in flags:
    proc = _launch("quantize", *flags, f"--outdir={tmp_path / 'r'}")
  else:
    proc = _launch("quantize", *flags, f"--outdir={tmp_path / 'r'}", config="quantize")
  _one_message(proc, *needles)
  assert not os.path.exists(tmp_path / "r")


def test_a_config_file_with_a_syntax_error_is_named(tmp_path):
  bad = tmp_path / "broken.py"
  bad.write_text("def get_config(:\n  pass\n")
  proc = _launch("quantize", f"--config={bad}", f"--outdir={tmp_path / 'r'}")
  _one_message(proc, "broken.py", "line 1")


# ----------------------------------------------------------------------------- training

TINY_TRAIN = '''
import importlib.util
spec = importlib.util.spec_from_file_location("base", {base!r})
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)

def get_config():
  c = base.get_config()
  c.model.block_out_channels, c.model.attention_levels = (8, 16), (1,)
  c.model.attention_head_dim, c.model.norm_num_groups = 16, 4
  c.data.num_color_seeds = 1
  c.batch_size, c.num_train_steps, c.log_every, c.checkpoint_every = 4, 2, 1, 2
  c.optim.warmup_steps = 1
  c.sample_steps, c.num_samples = 2, 4
  return c
'''


def test_train_launcher_writes_only_where_told(tmp_path):
  """experiments/train.py end to end on a tiny config: checkpoints and the grid in
  --workdir, the model in --export_dir, the extra grid at --figure, nothing else."""
  cfg = tmp_path / "tiny_train.py"
  cfg.write_text(TINY_TRAIN.format(base=os.path.join(ROOT, "configs", "default_model.py")))
  work, export, figure = tmp_path / "w", tmp_path / "m", tmp_path / "fig" / "grid.png"
  flags = (f"--config={cfg}", f"--workdir={work}", f"--export_dir={export}", f"--figure={figure}")
  proc = _launch("train", *flags, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "step 2/2" in proc.stdout and os.path.getsize(work / "samples.png") > 0
  assert os.path.getsize(figure) > 0
  assert os.path.isfile(export / files.META_JSON)
  assert sorted(os.listdir(tmp_path)) == ["fig", "m", "tiny_train.py", "w"]
  # an earlier export is replaced only with --overwrite
  _one_message(_launch("train", *flags), str(export), "--overwrite")


BAD_FACTORY = '''
import jax, jax.numpy as jnp
from examples.own_model import TinyEpsNet

def make():
  small = TinyEpsNet(channels=8)
  params = small.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
  return TinyEpsNet(channels=16), params["params"], dict(name="linear", num_timesteps=1000), (8, 8, 1)
'''


def test_factory_whose_params_do_not_fit_its_module_is_named(tmp_path, monkeypatch):
  (tmp_path / "mismatched_factory.py").write_text(BAD_FACTORY)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.syspath_prepend(ROOT)
  cfg = load_config("quantize")
  cfg.model = "mismatched_factory:make"
  with pytest.raises(ValueError, match=r"model factory 'mismatched_factory:make'.*"
                                       r"ScopeParamShapeError.*params must be its module's"):
    pipeline.run(cfg, str(tmp_path / "run"), verbose=False)
  assert not os.path.exists(tmp_path / "run")
