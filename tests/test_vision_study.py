"""The vision study end to end on the tiny config (digits at 8x8), its cache and its checks."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from compressjax import quantization
from compressjax.models import folding
from compressjax.studies import engine
from compressjax.studies import vision
from compressjax.training import checkpoint
from experiments import vision_kd_lora_int8
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("accuracy", "f1", "precision", "recall", "confusion", "params_total",
           "params_nonzero", "bytes", "compression", "acc_vs_teacher", "flops", "latency_ms",
           "seed", "model", "bits")
NAMES = ("teacher", "student", "distill", "lora", "int8_weights", "int8_dynamic",
         "int8_static")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """One tiny run: (config, plan, workdir, records)."""
  config = vision_kd_lora_int8.get_config("tiny")
  workdir = str(tmp_path_factory.mktemp("vision"))
  records = vision.run(config, workdir)
  return config, vision.validate(config), workdir, records


def _dir(plan, label):
  return label if label == "teacher" else next(
      s.name for s in plan.stages if s.name.split("_", 1)[1] == label)


def _restore(plan, workdir, label):
  path = os.path.join(workdir, "seed_0", _dir(plan, label), "variables")
  return jax.device_get(checkpoint.restore(path, plan.student_shapes))


def test_every_stage_reports_every_metric(study):
  config, _, workdir, records = study
  with open(os.path.join(workdir, "metrics.json")) as f:
    saved = json.load(f)
  assert [r["name"] for r in saved] == list(NAMES)
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
  for name in NAMES:
    assert f"| {name} |" in table
  # The pass marks come from the config, not from the library.
  assert "## Targets" in table
  for label, _, _ in config.targets:
    assert f"- {label}: accuracy >=" in table
  # The report explains itself: the run above the table, every column below it.
  assert table.index("- **study**: vision") < table.index("| stage |")
  assert "- **steps per stage**: teacher 60, student 60" in table
  for _, title, _ in vision.COLUMNS:
    assert f"- **{title}**: " in table.split("## Columns")[1], title
  assert os.path.exists(os.path.join(workdir, "confusion_int8_static.png"))
  assert os.path.exists(os.path.join(workdir, "pareto.png"))
  assert os.path.exists(os.path.join(workdir, "confusion.png"))
  assert saved == json.loads(json.dumps(records))


def test_bytes_come_from_the_export_with_batch_norm_folded(study):
  _, plan, workdir, records = study
  by_name = {r["name"]: r for r in records}
  spec = quantization.Spec(8, symmetric=True, granularity="channel")
  wq = _restore(plan, workdir, "int8_weights")
  # Every conv/dense kernel holds at most 255 levels per output channel (int8, narrow range).
  kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(wq["params"])
             if jax.tree_util.keystr(p).endswith("'kernel']")]
  assert kernels
  for k in kernels:
    k = np.asarray(k).reshape(-1, k.shape[-1])
    assert max(len(np.unique(k[:, j])) for j in range(k.shape[1])) <= 255
  # The export stores the folded model: kernels (codes), one bias per batch norm, no stats.
  eps = plan.student.bn_epsilon
  folded = folding.strip_batchnorm(folding.fold_batchnorm(wq, eps), eps)
  packed = quantization.export(folded, spec, plan.quant_where, regrid=True)
  assert by_name["int8_weights"]["bytes"] == quantization.nbytes(packed)
  assert by_name["int8_dynamic"]["bytes"] == quantization.nbytes(packed)
  assert "batch_stats" not in folded
  # Per output channel, folding commutes with the grid: the restored model computes what
  # the measured one did (same predictions on the latency batch).
  restored = folding.restore_batchnorm(quantization.load(packed), plan.student_shapes, eps)
  x = np.random.default_rng(0).normal(size=(8, *plan.image_shape)).astype(np.float32)
  np.testing.assert_allclose(plan.student_apply(restored, x), plan.student_apply(wq, x),
                             rtol=1e-3, atol=1e-3)
  # Static also stores the calibrated ranges: one float32 (lo, hi) pair per layer.
  with open(os.path.join(workdir, "seed_0", _dir(plan, "int8_static"), "ranges.json")) as f:
    ranges = json.load(f)
  static = by_name["int8_static"]["bytes"]
  assert quantization.nbytes(packed) + 17 * len(ranges) <= static
  assert static <= quantization.nbytes(packed) + 20 * len(ranges)
  # Float stages: float32 buffers plus an 8 + 4 * ndim header per tensor, batch norm folded
  # (12 bytes per channel fewer than the unfolded variables).
  lora = _restore(plan, workdir, "lora")
  tree = folding.strip_batchnorm(folding.fold_batchnorm(lora, eps), eps)
  expected = sum(x.nbytes + 8 + 4 * x.ndim for x in map(np.asarray, jax.tree.leaves(tree)))
  assert by_name["lora"]["bytes"] == expected
  unfolded = sum(np.asarray(x).nbytes for x in jax.tree.leaves(lora))
  assert sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)) < unfolded
  assert by_name["int8_weights"]["bytes"] < expected / 2


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_lora_trains_a_low_rank_update_and_keeps_batch_norm(study):
  config, plan, workdir, records = study
  assert config.lora.bn == "frozen"
  before, after = _restore(plan, workdir, "distill"), _restore(plan, workdir, "lora")
  for a, b in zip(jax.tree.leaves(before["batch_stats"]), jax.tree.leaves(after["batch_stats"])):
    np.testing.assert_array_equal(a, b)
  adapted = {"".join(f"['{s}']" for s in p.split("/")) for p in plan.lora_paths}
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
  # The stage kept its best validated model: the start (no change) or a trained one.
  row = {r["name"]: r for r in records}["lora"]
  assert changed == (len(adapted) if row["best_step"] > 0 else 0)
  # Trainable numbers: r * (in + out) per adapted kernel (Hu et al., 2021).
  shapes = [x.shape for k, x in old.items() if k in adapted]
  assert row["trainable_params"] == sum(
      config.lora.rank * (int(np.prod(s[:-1])) + s[-1]) for s in shapes)


def test_rerun_restores_finished_stages(study, monkeypatch):
  config, plan, workdir, records = study
  root = os.path.join(workdir, "seed_0")
  dirs = ["teacher"] + [s.name for s in plan.stages]
  files = [os.path.join(root, d, "record.json") for d in dirs]
  files += [os.path.join(root, d, "variables") for d in dirs]
  mtimes = [os.stat(f).st_mtime_ns for f in files]

  def no_training(*args, **kwargs):
    raise AssertionError("a finished stage was trained again")

  monkeypatch.setattr(engine, "train_group", no_training)
  again = vision.run(config, workdir)
  assert [os.stat(f).st_mtime_ns for f in files] == mtimes
  # Every measured value comes back from the cache; latency is timed again (all rows of a
  # seed together, interleaved), so it is left out.
  timeless = lambda rs: [{k: v for k, v in r.items() if not k.startswith("latency")}
                         for r in json.loads(json.dumps(rs))]
  assert timeless(again) == timeless(records)


def test_wireless_stage_kinds_run_on_the_vision_models(tmp_path):
  # Prune, then QAT at 4 bits: the student's pruned weights stay zero and its kernels land
  # on a 4-bit grid; the report has one row per stage.
  config = vision_kd_lora_int8.get_config("tiny")
  config.stages = "distill,prune,quantize"
  config.quantize.bits, config.prune.sparsity = 4, 0.5
  config.distill.steps = config.teacher.steps = 20
  records = vision.run(config, str(tmp_path))
  assert [r["name"] for r in records] == ["teacher", "distill", "prune", "quantize"]
  plan = vision.validate(config)
  final = _restore(plan, str(tmp_path), "quantize")
  masks = checkpoint.restore(os.path.join(tmp_path, "seed_0", "2_prune", "masks"),
                             _mask_target(plan))
  kernels = 0
  for path, keep in jax.tree_util.tree_leaves_with_path(masks):
    x = np.asarray(_at(final["params"], path))
    assert np.all(x[~np.asarray(keep)] == 0), path
    # 4-bit symmetric, narrow range: at most 15 levels per output channel.
    assert max(len(np.unique(c)) for c in x.reshape(-1, x.shape[-1]).T) <= 15, path
    kernels += 1
  assert kernels > 0
  quantized = {r["name"]: r for r in records}["quantize"]
  assert quantized["bits"] == 4 and quantized["params_nonzero"] < quantized["params_total"]


def _mask_target(plan):
  import optax  # pylint: disable=g-import-not-at-top
  from compressjax import stages  # pylint: disable=g-import-not-at-top
  return stages.carried_masks(stages.compose(optax.identity(), ("prune",), plan.prune,
                                             plan.weight_spec, where=plan.quant_where).init(
                                                 plan.student_shapes["params"]))


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


@pytest.mark.parametrize("field,value", [
    ("dataset", "mnist"),
    ("data_dir", ""),               # with dataset=cifar10 below
    ("data_dir", "/nonexistent/cifar"),
    ("lora.rank", 0),
    ("lora.rank", 100000),
    ("lora.bn", "train"),
    ("distill.alpha", 1.5),
    ("distill.temperature", 0.0),
    ("distill.init", "student"),
    ("teacher.optimizer", "rmsprop"),
    ("student.learning_rate", -1e-3),
    ("train.batch_size", 10 ** 6),
    ("train.batch_size", 12),       # not a multiple of the tests' 8 devices
    ("train.num_devices", 9),
    ("train.checkpoint_every", -1),
    ("train.max_nonfinite", 0),
    ("image_size", 12),
    ("stages", "student,int4"),
    ("stages", "distill,ptq:fast"),
    ("stages", "prune,lora"),
    ("stages", "quantize,ptq:weights"),
    ("stages", "student,student"),
    ("quantize.bits", 1),
    ("prune.sparsity", 1.5),
    ("targets", (("bar", 0.97),)),
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
  with pytest.raises(ValueError, match=leaf):
    vision.run(config, str(workdir))
  assert not workdir.exists()


def test_lora_paths_skip_depthwise_and_narrow_kernels():
  config = vision_kd_lora_int8.get_config("tiny")
  plan = vision.validate(config)
  params = plan.student_shapes["params"]
  kernels = {jax.tree_util.keystr(p): x.shape for p, x in
             jax.tree_util.tree_leaves_with_path(params) if x.ndim >= 2}
  assert any(s[2] == 1 for s in kernels.values())  # the model has depthwise kernels
  for rank, classifier in ((4, True), (11, True), (4, False)):
    paths = vision.lora_paths(params, rank, classifier)
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


def _launch_args(workdir):
  return [sys.executable, os.path.join(ROOT, "launch.py"),
          "--config=experiments/vision_kd_lora_int8.py:tiny", f"--workdir={workdir}",
          "--config.stages=student", "--config.teacher.steps=80",
          "--config.train.checkpoint_every=20", "--config.student.steps=20"]


@pytest.mark.slow
def test_a_vision_run_killed_with_sigkill_resumes_to_the_uninterrupted_variables(tmp_path):
  done = tmp_path / "done"
  out = subprocess.run(_launch_args(done), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  killed = tmp_path / "killed"
  ckpt_dir = killed / "seed_0" / "teacher" / "ckpt"
  returncode = helpers.kill_after_first_checkpoint(_launch_args(killed), ROOT, ckpt_dir,
                                                   max_delay=0.3)
  assert returncode == -signal.SIGKILL
  assert not (killed / "seed_0" / "teacher" / "variables").exists(), "the kill came too late"
  resumed = subprocess.run(_launch_args(killed), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from the checkpoint at step" in open(killed / "log.txt").read()
  plan = vision.validate(vision_kd_lora_int8.get_config("tiny"))
  for stage, shapes in (("teacher", plan.teacher_shapes), ("1_student", plan.student_shapes)):
    a, b = (jax.device_get(checkpoint.restore(str(w / "seed_0" / stage / "variables"), shapes))
            for w in (killed, done))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)  # bit-identical on CPU
  # The selection resumed too: the same best step and validation accuracy.
  rec = lambda w: json.load(open(w / "seed_0" / "teacher" / "record.json"))
  assert (rec(killed)["best_step"], rec(killed)["val_accuracy"]) == (
      rec(done)["best_step"], rec(done)["val_accuracy"])


def test_served_forms_compute_the_measured_models(study):
  """The timed form (BN folded, int8 codes dequantized in the jit) gives the logits of the
  model that was measured, to float32 rounding."""
  _, plan, workdir, _ = study
  x = np.random.default_rng(0).normal(size=(4, *plan.image_shape)).astype(np.float32)
  for label, spec in (("lora", None), ("int8_weights", plan.weight_spec)):
    v = _restore(plan, workdir, label)
    apply, stored = vision._served(plan, plan.student, [v], spec, None, {})
    if spec is not None:
      codes = [t for t in jax.tree.leaves(stored[0], is_leaf=lambda t: hasattr(t, "codes"))
               if hasattr(t, "codes")]
      assert codes and all(t.codes.dtype == np.int8 for t in codes)
      assert "batch_stats" not in stored[0] or not any(
          "mean" in str(p) for p, _ in jax.tree_util.tree_leaves_with_path(stored[0]))
    want = np.asarray(plan.student_apply(v, x))
    got = np.asarray(apply(stored[0], x))
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), err_msg=label)
