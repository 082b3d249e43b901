"""The vision study end to end on the tiny config (digits at 8x8), its cache and its checks."""

import json
import os

import jax
import numpy as np
import pytest

from compressjax import datasets
from compressjax import quantization
from compressjax import vision_config
from compressjax import vision_pipeline
from compressjax import vision_train
from compressjax.training import checkpoint
from experiments import vision_kd_lora_int8

METRICS = ("accuracy", "f1", "precision", "recall", "confusion", "params_total",
           "params_nonzero", "bytes", "compression", "acc_vs_teacher", "flops", "latency_ms",
           "seed", "model", "bits")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """One tiny run: (config, setup, workdir, records)."""
  config = vision_kd_lora_int8.get_config("tiny")
  workdir = str(tmp_path_factory.mktemp("vision"))
  records = vision_pipeline.run(config, workdir)
  return config, vision_pipeline.validate(config), workdir, records


def _restore(setup, workdir, stage):
  path = os.path.join(workdir, "seed_0", stage, "variables")
  return jax.device_get(checkpoint.restore(path, setup.student_shapes))


def test_every_stage_reports_every_metric(study):
  config, _, workdir, records = study
  with open(os.path.join(workdir, "metrics.json")) as f:
    saved = json.load(f)
  assert [r["name"] for r in saved] == list(vision_config.STAGES)
  for r in saved:
    missing = [k for k in METRICS if r.get(k) is None]
    assert not missing, (r["name"], missing)
    cm = np.asarray(r["confusion"])
    assert cm.shape == (10, 10) and cm.sum() == config.num_test
    # Accuracy and macro F1 recomputed from the confusion matrix (rows true, columns predicted).
    np.testing.assert_allclose(r["accuracy"], np.trace(cm) / cm.sum())
    tp, pred, true = np.diag(cm), cm.sum(0), cm.sum(1)
    p = np.where(pred > 0, tp / np.maximum(pred, 1), 0.0)
    rc = np.where(true > 0, tp / np.maximum(true, 1), 0.0)
    f1 = np.where(p + rc > 0, 2 * p * rc / np.maximum(p + rc, 1e-12), 0.0)
    np.testing.assert_allclose(r["f1"], f1.mean(), atol=1e-12)
    assert r["flops"] > 0 and r["latency_ms"] > 0
  teacher = saved[0]
  for r in saved:
    np.testing.assert_allclose(r["compression"], teacher["bytes"] / r["bytes"])
  with open(os.path.join(workdir, "results.md")) as f:
    table = f.read()
  for name in vision_config.STAGES:
    assert f"| {name} |" in table
  assert "## Targets" in table
  assert os.path.exists(os.path.join(workdir, "pareto.png"))
  assert os.path.exists(os.path.join(workdir, "confusion.png"))
  assert saved == json.loads(json.dumps(records))


def test_bytes_come_from_the_export(study):
  _, setup, workdir, records = study
  by_name = {r["name"]: r for r in records}
  spec = quantization.Spec(8, symmetric=True, granularity="channel")
  wq = _restore(setup, workdir, "int8_weights")
  packed = quantization.export(wq, spec)
  assert by_name["int8_weights"]["bytes"] == quantization.nbytes(packed)
  assert by_name["int8_dynamic"]["bytes"] == quantization.nbytes(packed)
  # The quantized weights are already on their grid: the export stores them exactly.
  for a, b in zip(jax.tree.leaves(quantization.load(packed)), jax.tree.leaves(wq)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Every conv/dense kernel holds at most 255 levels per output channel (int8, narrow range).
  kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(wq["params"])
             if jax.tree_util.keystr(p).endswith("'kernel']")]
  assert kernels
  for k in kernels:
    k = np.asarray(k).reshape(-1, k.shape[-1])
    assert max(len(np.unique(k[:, j])) for j in range(k.shape[1])) <= 255
  # Static also stores the calibrated ranges: one float32 (lo, hi) pair per layer.
  with open(os.path.join(workdir, "seed_0", "int8_static", "ranges.json")) as f:
    ranges = json.load(f)
  tree = {**wq, "activation_ranges": {k: np.asarray(v, np.float32) for k, v in ranges.items()}}
  static = by_name["int8_static"]["bytes"]
  assert static == quantization.nbytes(quantization.export(tree, spec))
  # (12-byte header + 8 bytes, or a 1-byte bitmask + 4 bytes when lo is 0: see export.)
  assert quantization.nbytes(packed) + 17 * len(ranges) <= static
  assert static <= quantization.nbytes(packed) + 20 * len(ranges)
  # Float stages: float32 buffers plus an 8 + 4 * ndim header per tensor.
  lora = _restore(setup, workdir, "lora")
  expected = sum(x.nbytes + 8 + 4 * x.ndim for x in map(np.asarray, jax.tree.leaves(lora)))
  assert by_name["lora"]["bytes"] == expected
  assert by_name["int8_weights"]["bytes"] < expected / 2


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_lora_stage_keeps_batch_norm_and_unadapted_leaves(study):
  config, setup, workdir, _ = study
  assert config.lora.bn == "frozen"
  before, after = _restore(setup, workdir, "distill"), _restore(setup, workdir, "lora")
  for a, b in zip(jax.tree.leaves(before["batch_stats"]), jax.tree.leaves(after["batch_stats"])):
    np.testing.assert_array_equal(a, b)
  adapted = {"".join(f"['{s}']" for s in p.split("/")) for p in setup.lora_paths}
  old = _leaves(before["params"])
  for key, x in _leaves(after["params"]).items():
    if key not in adapted:
      np.testing.assert_array_equal(x, old[key], err_msg=key)


def test_lora_trains_a_low_rank_update_of_the_adapted_kernels(study, monkeypatch):
  # The run keeps the best model on validation, possibly the unchanged start; here every
  # validation ties, so the last one (ties go to the later model) is kept.
  config, setup, workdir, _ = study
  fit = vision_train.fit
  monkeypatch.setattr(vision_train, "fit", lambda *a, **kw: fit(
      *a, **{**kw, "val_accuracy": lambda v: 0.0}))
  data = vision_pipeline.load_data(config)
  splits = [datasets.to_device(x, y) for x, y in (
      (data.train_images, data.train_labels), (data.val_images, data.val_labels))]
  ctx = vision_pipeline.Context(config, setup, data, *splits, splits[1], None,
                                str(workdir), 0, jax.random.key(0))
  before = _restore(setup, workdir, "distill")
  teacher = jax.device_get(checkpoint.restore(
      os.path.join(workdir, "seed_0", "teacher", "variables"), setup.teacher_shapes))
  after, info = vision_pipeline._lora(ctx, before, teacher)  # pylint: disable=protected-access
  assert info["best"]["step"] == config.lora.steps
  for a, b in zip(jax.tree.leaves(before["batch_stats"]), jax.tree.leaves(after["batch_stats"])):
    np.testing.assert_array_equal(a, b)
  adapted = {"".join(f"['{s}']" for s in p.split("/")) for p in setup.lora_paths}
  old = _leaves(before["params"])
  changed = 0
  for key, x in _leaves(after["params"]).items():
    d = x - old[key]
    if key not in adapted:
      np.testing.assert_array_equal(d, 0.0, err_msg=key)
      continue
    assert "depthwise" not in key
    changed += bool(np.any(d))
    assert np.linalg.matrix_rank(d.reshape(-1, d.shape[-1]), tol=1e-6) <= config.lora.rank
  assert changed == len(adapted)
  # Trainable numbers: r * (in + out) per adapted kernel (Hu et al., 2021).
  shapes = [x.shape for k, x in old.items() if k in adapted]
  assert info["lora_params"] == sum(
      config.lora.rank * (int(np.prod(s[:-1])) + s[-1]) for s in shapes)


def test_rerun_restores_finished_stages(study, monkeypatch):
  config, _, workdir, records = study
  root = os.path.join(workdir, "seed_0")
  files = [os.path.join(root, s, "record.json") for s in vision_config.STAGES]
  files += [os.path.join(root, s, "variables") for s in ("teacher", "lora", "int8_weights")]
  mtimes = [os.stat(f).st_mtime_ns for f in files]

  def no_training(*args, **kwargs):
    raise AssertionError("a finished stage was trained again")

  monkeypatch.setattr(vision_train, "fit", no_training)
  again = vision_pipeline.run(config, workdir)
  assert [os.stat(f).st_mtime_ns for f in files] == mtimes
  assert json.loads(json.dumps(again)) == json.loads(json.dumps(records))


@pytest.mark.parametrize("field,value", [
    ("dataset", "mnist"),
    ("data_dir", ""),               # with dataset=cifar10 below
    ("data_dir", "/nonexistent/cifar"),
    ("lora.rank", 0),
    ("lora.rank", 100000),
    ("lora.bn", "train"),
    ("distill.alpha", 1.5),
    ("distill.temperature", 0.0),
    ("teacher.optimizer", "rmsprop"),
    ("student.learning_rate", -1e-3),
    ("train.batch_size", 10 ** 6),
    ("train.batch_size", 12),       # not a multiple of the tests' 8 devices
    ("train.num_devices", 9),
    ("image_size", 12),
    ("quantize.modes", ("weights", "int4")),
    ("quantize.bits", 1),
    ("seeds", ()),
])
def test_bad_config_fails_before_any_work(tmp_path, field, value):
  config = vision_kd_lora_int8.get_config("tiny")
  if field == "data_dir":
    config.dataset = "cifar10"
    config.image_size = 32
  node, _, leaf = field.rpartition(".")
  (config[node] if node else config)[leaf] = value
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=leaf if leaf != "modes" else "quantize.modes"):
    vision_pipeline.run(config, str(workdir))
  assert not workdir.exists()


def test_lora_paths_skip_depthwise_and_narrow_kernels():
  config = vision_kd_lora_int8.get_config("tiny")
  setup = vision_pipeline.validate(config)
  params = setup.student_shapes["params"]
  kernels = {jax.tree_util.keystr(p): x.shape for p, x in
             jax.tree_util.tree_leaves_with_path(params) if x.ndim >= 2}
  assert any(s[2] == 1 for s in kernels.values())  # the model has depthwise kernels
  for rank, classifier in ((4, True), (11, True), (4, False)):
    paths = vision_config.lora_paths(params, rank, classifier)
    assert not any("depthwise" in p for p in paths)
    # The classifier [C, 10] fits a rank up to 10, and is left out on request.
    assert ("classifier/kernel" in paths) == (rank <= 10 and classifier)
    assert all(min(int(np.prod(params_shape[:-1])), params_shape[-1]) >= rank
               for params_shape in (_shape(params, p) for p in paths))


def _shape(params, path):
  node = params
  for k in path.split("/"):
    node = node[k]
  return node.shape


def test_fit_keeps_the_best_validation_model():
  # A fake step (no model): params count steps; validation accuracy is scripted per step.
  scripted = {2: 0.5, 4: 0.9, 6: 0.9, 8: 0.7, 9: 0.1, 0: 0.95}

  class State:
    def __init__(self, step):
      self.step = np.int32(step)

  step_fn = lambda s: (State(int(s.step) + 1), {"loss": np.float32(1.0)})
  for include_start, best_step in ((False, 6), (True, 0)):
    variables, history, best = vision_train.fit(
        State(0), step_fn, 9, step_args=(), to_variables=lambda s: {"step": int(s.step)},
        val_accuracy=lambda v: scripted[v["step"]], eval_every=2, log_every=5, name="fake",
        include_start=include_start)
    val_steps = [h["step"] for h in history if "val_accuracy" in h]
    assert val_steps == ([0] if include_start else []) + [2, 4, 6, 8, 9]
    assert best == {"step": best_step, "val_accuracy": scripted[best_step]}
    assert variables == {"step": best_step}
