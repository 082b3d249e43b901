"""bench/device_check.py at tiny size on CPU: every section's figures, the training check."""

import contextlib
import importlib.util
import io
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
  """bench/ is no package: the script loaded by path, as ``python bench/...`` runs it."""
  spec = importlib.util.spec_from_file_location(
      "device_check", os.path.join(ROOT, "bench", "device_check.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """(exit code, printed text, JSON figures) of ``main(["--size=tiny", "--json=..."])``."""
  path = tmp_path_factory.mktemp("device_check") / "check.json"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = _load().main(["--size=tiny", f"--json={path}"])
  with open(path) as f:
    return rc, out.getvalue(), json.load(f)


def _positive(x):
  return isinstance(x, float) and math.isfinite(x) and x > 0


def test_every_section_is_reported(tiny_run):
  _, text, r = tiny_run
  assert {"simulator", "train", "served_int8", "training"} <= set(r)
  assert r["size"] == "tiny" and r["platform"] == "cpu"
  for header in ("[1] simulator", "[2] teacher train step", "[3] served INT8", "[4] training"):
    assert header in text


def test_throughputs_are_finite_and_positive(tiny_run):
  _, text, r = tiny_run
  assert _positive(r["simulator"]["samples_per_s"])
  t = r["train"]
  for name in ("float32", "bfloat16", "cpu_default"):
    assert _positive(t[name]["steps_per_s"]) and _positive(t[name]["frames_per_s"]), name
  for name in ("float32", "bfloat16"):
    assert _positive(t[name]["vs_cpu_default"])
  # The CPU default on the CPU that is also the device checked: said so.
  assert t["cpu_default"]["same_machine"] and "same machine" in text
  # The targets are printed beside the figures, not asserted.
  assert r["simulator"]["target"] == 1e9 and t["target"] == 20


def test_served_ratio_lies_in_its_percentiles(tiny_run):
  v = tiny_run[2]["served_int8"]
  assert all(_positive(v[k]) for k in ("ratio", "lo", "hi", "float_ms", "int8_ms"))
  assert v["lo"] <= v["ratio"] <= v["hi"]
  assert "int8 codes" in v["form"]


def test_training_check_passes(tiny_run):
  rc, text, r = tiny_run
  c = r["training"]
  assert c["steps"] == 20 and c["finite"] and c["passed"]
  assert c["last"] < c["first"]
  assert rc == 0 and "PASS" in text


def test_bad_size_names_the_flag_and_the_allowed_values(capsys):
  with pytest.raises(SystemExit) as e:
    _load().main(["--size=huge"])
  assert e.value.code != 0
  err = capsys.readouterr().err
  assert "--size" in err and "huge" in err
  for size in ("tiny", "cpu", "full"):
    assert repr(size) in err
