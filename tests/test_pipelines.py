"""End to end: the combined pipelines on a tiny config, their report and constraints."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from compressjax import quantization
from compressjax import stages
from compressjax.studies import engine
from compressjax.studies import wireless
from compressjax.studies import wireless_measure
from compressjax.training import checkpoint
from experiments import sweep
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("accuracy", "f1", "precision", "recall", "confusion", "ser_mean", "ber_mean",
           "ser", "nmse_db", "params_total", "params_nonzero", "bytes", "compression",
           "flops", "latency_ms", "sparsity", "bits")


def _config(**only):
  """The tiny sweep with P-Q-KD and Q-P-KD, or with only the pipelines ``only`` names."""
  c = sweep.get_config("tiny")
  for name in list(c.pipelines):
    if only or name not in ("P-Q-KD", "Q-P-KD"):
      del c.pipelines[name]
  for name, text in only.items():
    c.pipelines[name] = text
  if only:
    c.compare = ()
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One tiny run for the whole module: P-Q-KD and Q-P-KD, plus a pipeline whose only stage
  is P-Q-KD's first (a shared prefix) and the uncompressed control."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = _config()
  config.pipelines.prune = "prune"
  config.pipelines.control = "finetune"
  config.finetune.steps = 5
  records = wireless.run(config, workdir)
  return config, workdir, records


def _final_params(config, workdir, pipeline):
  setup = wireless.validate(config)
  from compressjax.models import iq_transformer
  target = jax.eval_shape(lambda: iq_transformer.init_params(setup.teacher, jax.random.key(0)))
  stage_dir = os.path.join(workdir, "seed_0", pipeline, "3_distill", "variables")
  return setup, jax.device_get(checkpoint.restore(stage_dir, target))


@pytest.mark.slow
def test_metrics_json_has_every_metric_for_every_stage(run):
  config, workdir, _ = run
  records = json.load(open(os.path.join(workdir, "metrics.json")))
  names = [r["name"] for r in records]
  assert names == ["teacher", "P-Q-KD/1_prune", "P-Q-KD/2_quantize",
                   "P-Q-KD/3_distill:inherit", "Q-P-KD/1_quantize", "Q-P-KD/2_prune",
                   "Q-P-KD/3_distill:inherit", "control/1_finetune", "prune/1_prune"]
  for r in records:
    missing = [m for m in METRICS if r.get(m) is None]
    assert not missing, (r["name"], missing)
    assert set(r["ser"]) >= {"snr_db", "model", "ls", "lmmse", "perfect_csi"}
  for f in ("results.md", "ser_vs_snr.png", "pareto.png", "confusion.png"):
    assert os.path.getsize(os.path.join(workdir, f)) > 0
  assert "| Q-P-KD/2_prune |" in open(os.path.join(workdir, "results.md")).read()


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["P-Q-KD", "Q-P-KD"])
def test_final_model_honours_every_constraint_and_bytes_come_from_export(run, pipeline):
  config, workdir, records = run
  setup, params = _final_params(config, workdir, pipeline)
  kernels = {p: np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)
             if jax.tree_util.keystr(p).endswith("['kernel']")}
  for path, k in kernels.items():
    # Every pruned kernel keeps at least its target sparsity (one weight of slack).
    zeros = k.size - np.count_nonzero(k)
    assert zeros >= round(config.prune.sparsity * k.size) - 1, path
    # ... and every kernel lies on its quantization grid.
    np.testing.assert_allclose(np.asarray(quantization.fake_quant(k, setup.spec)), k,
                               rtol=0, atol=1e-5 * np.abs(k).max())
  final = [r for r in records if r["name"] == f"{pipeline}/3_distill:inherit"][0]
  assert final["bytes"] == quantization.nbytes(quantization.export(params, setup.spec))
  teacher = [r for r in records if r["name"] == "teacher"][0]
  # int8 and 50% sparse kernels; biases, norms and positions stay fp32 in a tiny model.
  assert final["bytes"] < teacher["bytes"] / 3


@pytest.mark.slow
def test_rerun_skips_finished_stages(run):
  config, workdir, records = run
  ckpt = os.path.join(workdir, "seed_0", "Q-P-KD", "2_prune", "variables")
  before = os.path.getmtime(ckpt)
  again = wireless.run(config, workdir)
  assert os.path.getmtime(ckpt) == before
  assert [r["accuracy"] for r in again] == [r["accuracy"] for r in records]


@pytest.mark.parametrize("override, message", [
    ({"pipelines.x": "prune,shrink"}, "stage must be one of"),
    ({"pipelines.x": "quantize:fast"}, "takes no option"),
    ({"pipelines.x": "distill:big"}, "distill student must be one of"),
    ({"channel.profile": "office"}, "channel.profile must be one of"),
    ({"channel.snr_db": (10.0, 5.0)}, "snr_db"),
    ({"prune.sparsity": 1.0}, "prune.sparsity must be in"),
    ({"prune.structure": "3:2"}, "3:2"),
    ({"prune.score": "entropy"}, "score"),
    ({"prune.schedule": "cubic"}, "prune.schedule"),
    ({"quantize.bits": 1}, "bits"),
    ({"quantize.granularity": "row"}, "granularity"),
    ({"distill.alpha": 1.5}, "distill.alpha"),
    ({"distill.temperature": 0.0}, "distill.temperature"),
    ({"train.steps": 0}, "train.steps"),
    ({"train.learning_rate": -1.0}, "train.learning_rate"),
    ({"teacher.patch": 3}, "teacher: seq_len must be a multiple"),
    ({"seeds": ()}, "seeds"),
    ({"eval.snr_points": (5.0, 0.0)}, "eval.snr_points"),
    ({"eval.frames_per_point": 33}, "eval.frames_per_point must be a multiple"),
    ({"compare": ("P-Q-KD", "nope")}, "compare must be"),
    ({"pipelines.x": "finetune:more"}, "takes no option"),
    ({"teacher.frontend": "fft"}, "frontend must be one of"),
    ({"channel.modulation_pilots": False}, "teacher.frontend must be 'raw'"),
    ({"train.tasks": ("modulation", "weather")}, "train.tasks must be distinct names"),
])
def test_bad_config_is_rejected_naming_the_field(override, message):
  c = _config()
  helpers.set_fields(c, override)
  with pytest.raises(ValueError, match=message):
    wireless.validate(c)


def test_validate_resolves_every_stage_into_a_plan():
  c = _config(S="prune,distill:small,finetune", Q="quantize,prune")
  c.quantize.steps = 0
  plan = wireless.validate(c)
  assert plan.eval.snr_points == tuple(c.eval.snr_points) and plan.tasks == tuple(c.train.tasks)
  assert plan.teacher_optimizer == engine.OptimizerPlan(
      "adamw", c.train.learning_rate, c.train.steps, c.train.warmup_steps,
      c.train.weight_decay, 0.05)
  prune, small, finetune = plan.pipelines["S"]
  assert (prune.dirname, prune.label, prune.prefix) == ("1_prune", "1_prune", "prune:")
  assert prune.optimizer.steps == c.prune.steps and prune.model == plan.teacher
  # A fresh student: the teacher's budget and schedule, distilled from the teacher; the
  # prune constraint stays in force (its masks re-derived on the new architecture).
  assert small.label == "2_distill:small" and small.prefix == "prune:,distill:small"
  assert small.from_init and small.kd and small.model == plan.student
  assert small.optimizer == plan.teacher_optimizer and small.steps == c.train.steps
  assert small.constraints == finetune.constraints == ("prune",)
  assert finetune.model == plan.student and not finetune.kd and not finetune.from_init
  ptq, qprune = plan.pipelines["Q"]
  assert ptq.optimizer is None and ptq.steps == 0 and ptq.constraints == ("quantize",)
  assert qprune.constraints == ("quantize", "prune")


def _launch(*args, cwd=ROOT):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--config=experiments/does_not_exist.py"], "No such file"),
    (["--config.prune.sparsity=abc"], "could not convert"),
    (["--config.pipelines.prune=prune,shrink"], "stage must be one of"),
    (["--config=experiments/prune.py:huge"], "config size must be one of"),
])
def test_launch_rejects_bad_input_before_any_work(tmp_path, args, message):
  workdir = tmp_path / "w"
  out = _launch(*args, f"--workdir={workdir}")
  assert out.returncode != 0
  assert message in out.stdout + out.stderr
  assert not workdir.exists()


def test_launch_rejects_a_workdir_that_is_a_file(tmp_path):
  f = tmp_path / "file"
  f.write_text("keep me")
  out = _launch(f"--workdir={f}")
  assert out.returncode != 0 and "--workdir must be a directory" in out.stderr
  assert f.read_text() == "keep me"


@pytest.mark.slow
def test_post_training_quantization_stage_keeps_the_pruned_zeros(run, tmp_path):
  c = _config(PQ="prune,quantize")
  c.quantize.steps = 0  # PTQ: no training, the stack's constraints applied once
  # The module run's teacher (same training config): restored, not trained again.
  shutil.copytree(os.path.join(run[1], "seed_0", "teacher"), tmp_path / "seed_0" / "teacher",
                  ignore=shutil.ignore_patterns("ckpt"))
  records = {r["name"]: r for r in wireless.run(c, str(tmp_path))}
  pruned, ptq = records["PQ/1_prune"], records["PQ/2_quantize"]
  assert ptq["sparsity"] >= c.prune.sparsity - 1e-3
  assert ptq["params_nonzero"] <= pruned["params_nonzero"]
  assert ptq["bits"] == 8 and ptq["bytes"] < pruned["bytes"]


@pytest.mark.slow
def test_report_answers_in_db_beside_the_references(run):
  config, workdir, records = run
  teacher = records[0]
  assert teacher["name"] == "teacher" and teacher["loss_db_1e-01"] in (0.0, None)
  points = list(config.eval.snr_points)
  for r in records:
    assert r["ser"]["snr_db"] == points and len(r["ser_interval"]["lo"]) == len(points)
    assert all(lo <= m <= hi for lo, m, hi in zip(r["ser_interval"]["lo"], r["ser"]["model"],
                                                  r["ser_interval"]["hi"]))
    assert r["accuracy_curve"]["known_channel"] and r["ser_top"] == r["ser"]["model"][-1]
    # The loss in dB is the stage's Es/N0 at the target minus the teacher's, when both exist.
    for t in ("1e-01", "1e-02"):
      if r[f"snr_at_{t}"] is not None and teacher[f"snr_at_{t}"] is not None:
        assert r[f"loss_db_{t}"] == pytest.approx(r[f"snr_at_{t}"] - teacher[f"snr_at_{t}"])
  refs = json.load(open(os.path.join(workdir, "references.json")))
  assert set(refs["summary"]) == {"ls", "lmmse", "perfect_csi"}
  text = open(os.path.join(workdir, "results.md")).read()
  assert "| lmmse |" in text and "Paired differences P-Q-KD - Q-P-KD" in text
  assert "one seed only" in text
  assert os.path.getsize(os.path.join(workdir, "accuracy_vs_snr.png")) > 0
  # The report explains itself: the run above the table, every column below it, one
  # confusion matrix per final stage, latency relative to the teacher timed interleaved.
  assert text.index("- **study**: wireless") < text.index("| stage |")
  assert "- **evaluated at**: Es/N0 = 0 to 30 dB" in text and "- **size**: tiny" in text
  for _, title, _ in wireless_measure.COLUMNS:
    assert f"- **{title}**: " in text.split("## Columns")[1], title
  for name in ("P-Q-KD_3_distill_inherit", "Q-P-KD_3_distill_inherit", "control_1_finetune"):
    assert os.path.getsize(os.path.join(workdir, f"confusion_{name}.png")) > 0
  assert "| 1 (reference) |" in text
  assert all(r["latency_ms"] > 0 and r["latency_vs_teacher_lo"] <= r["latency_vs_teacher"]
             <= r["latency_vs_teacher_hi"] for r in records)


@pytest.mark.slow
def test_pipeline_carries_the_prune_stage_masks_to_every_later_stage(run):
  # The set of pruned weights is the prune stage's, exactly, after quantize and distill
  # (P-Q-KD), and stays pruned after distill when the prune stage ran on the grid (Q-P-KD).
  import optax
  from compressjax.models import iq_transformer
  config, workdir, _ = run
  setup = wireless.validate(config)
  target = jax.eval_shape(lambda: iq_transformer.init_params(setup.teacher, jax.random.key(0)))
  mask_target = stages.carried_masks(stages.compose(
      optax.identity(), ("prune",), setup.prune, setup.spec).init(target))
  for pipeline, prune_dir in (("P-Q-KD", "1_prune"), ("Q-P-KD", "2_prune")):
    saved = checkpoint.restore(os.path.join(workdir, "seed_0", pipeline, prune_dir, "masks"),
                               mask_target)
    _, final = _final_params(config, workdir, pipeline)
    final = {jax.tree_util.keystr(p): np.asarray(x)
             for p, x in jax.tree_util.tree_leaves_with_path(final)}
    checked = 0
    for path, keep in jax.tree_util.tree_leaves_with_path(saved):
      x, pruned = final[jax.tree_util.keystr(path)], ~np.asarray(keep)
      assert pruned.any() and np.all(x[pruned] == 0), path
      if pipeline == "P-Q-KD":   # float weights when pruned: nothing else is exactly zero
        np.testing.assert_array_equal(x == 0, pruned, err_msg=str(path))
      checked += 1
    assert checked >= 4


@pytest.mark.slow
def test_a_shared_stage_prefix_runs_once(run):
  _, workdir, records = run
  records = {r["name"]: r for r in records}
  shared = records["prune/1_prune"]
  assert shared["same_as"] == "P-Q-KD/1_prune"
  assert not os.path.exists(os.path.join(workdir, "seed_0", "prune"))
  assert shared["ser"]["model"] == records["P-Q-KD/1_prune"]["ser"]["model"]
  # The control is trained, uncompressed: fp32 bytes and no pruned weights.
  control = records["control/1_finetune"]
  assert control["bits"] == 32 and control["bytes"] == records["teacher"]["bytes"]
  assert control["ser"]["model"] != records["teacher"]["ser"]["model"]
