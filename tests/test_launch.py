"""launch.py as a user meets it: a quiet console, the full log in WORKDIR/log.txt, --config_help."""

import os
import re
import subprocess
import sys

import pytest

from experiments import baseline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TINY = ["--config=" + os.path.join(ROOT, "experiments", "baseline.py") + ":tiny",
         "--config.train.steps=4", "--config.train.warmup_steps=1", "--config.train.log_every=2",
         "--config.eval.frames_per_point=32", "--config.eval.batch_size=32",
         "--config.eval.snr_points=(0.0,30.0)"]
# Lines that orbax and absl write at INFO: option dumps, directory creation, saves.
_LIBRARY_LINES = re.compile(r"CheckpointManagerOptions|checkpoint_manager\.py|orbax")


# One CPU device, as a user's laptop has (the test session forces 8); the session's fast
# compile flags are kept (tests/conftest.py).
_ENV = {**os.environ, "XLA_FLAGS": " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count"))}


def _launch(*args, cwd=ROOT):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=cwd,
                       env=_ENV, capture_output=True, text=True, timeout=120)
  return out, out.stdout + out.stderr


@pytest.mark.slow  # ~25-45 s on 2 cores: a 4-step teacher, its evaluation, the references
def test_console_is_quiet_and_the_log_file_has_the_rest(tmp_path):
  workdir = tmp_path / "w"
  out, text = _launch(*_TINY, f"--workdir={workdir}")
  assert out.returncode == 0, text[-3000:]
  lines = text.splitlines()
  assert not _LIBRARY_LINES.search(text), text
  assert "config:" not in text                                    # the ConfigDict dump
  assert "train.steps=4" in text and f"-> {workdir}" in text       # the short summary
  assert re.search(r"teacher \[[#.]+\] 2/4 .*loss", text)           # progress lines
  assert re.search(r"teacher \[[#.]+\] 4/4 .*loss", text)
  assert sum("stage done:" in line for line in lines) == 1         # the teacher's row
  assert open(workdir / "results.md").read().strip() in out.stdout  # the results table
  assert len(lines) < 60, text
  log = open(workdir / "log.txt").read()
  assert _LIBRARY_LINES.search(log) and "config:" in log and "teacher [" in log


@pytest.mark.parametrize("flag", ["--verbose", "--verbosity=1"])
def test_verbose_brings_the_full_log_back_to_the_console(tmp_path, flag):
  # The whole-config dump is the first record kept off a quiet console; the run is stopped
  # at the record after it, before any training.
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *_TINY, flag,
                           f"--workdir={tmp_path / 'w'}"], env=_ENV, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  seen = []
  try:
    for line in proc.stdout:
      seen.append(line)
      if any("] config:" in s for s in seen[:-1]) and re.match(r"[DIWE]\d{4} ", line):
        break
  finally:
    proc.kill()
    proc.wait(timeout=30)
  text = "".join(seen)
  assert "] config:" in text and "\nchannel:\n" in text and "  steps: 4\n" in text, text


def test_config_help_lists_fields_with_comments_and_writes_nothing(tmp_path):
  c = baseline.get_config("tiny")
  out, text = _launch(*_TINY[:2], "--config_help", f"--workdir={tmp_path / 'w'}",
                      cwd=tmp_path)
  assert out.returncode == 0, text
  lines = out.stdout.splitlines()
  assert "train.steps = 4" in lines                                 # overrides applied
  assert f"train.batch_size = {c.train.batch_size}  # frames per task per step" in lines
  assert any(line.startswith(f"eval.snr_points = {c.eval.snr_points!r}  # 0, 2.5")
             for line in lines)
  frontend = [line for line in lines if line.startswith("teacher.frontend = 'pilots'  # ")]
  assert len(frontend) == 1 and "LMMSE-equalized" in frontend[0]  # the comment above it
  assert any(line.startswith("# eval: Every stage and the classical references") for line in lines)
  assert os.listdir(tmp_path) == []                                 # nothing written


def test_help_mentions_config_help():
  _, text = _launch("--help")
  assert "--config_help" in text and "--verbose" in text
