"""Served latency of the vision study's student (MobileNetV2 x0.25) against its teacher, on CPU.

Run: python bench/vision_served.py [--rounds=N]. The default "cpu" config's models
(experiments/vision_kd_lora_int8.py: ResNet-18 width 16 and MobileNetV2 x0.25, 16x16x3 inputs,
10 classes), jitted in inference mode, at the study's latency batch (1) and its eval batch
(256), timed in interleaved rounds in this one process (`training.interleaved_latency`), so a
slow spell of a shared machine hits every variant alike. Each ratio is taken round by round
against the reference and printed as its 10th / 50th / 90th percentiles; the teacher timed
twice (two separately jitted copies) gives the noise of a ratio that should be 1.

With --profile, a profile of each form at each batch: its arguments (pytree leaves, each
parsed and handed to XLA per call), the thunks of its compiled CPU program by kind, and their
busy time per call from a `jax.profiler` trace (the profiler inflates tiny thunks; read the
shares, not the totals).

Forms, for each model (random weights and BN statistics: speed does not depend on them):
  bn      the variables as the study applies them (batch norm in inference mode);
  folded  the served form: batch norm folded into the convs and the stored tree
          (`folding.strip_batchnorm`) passed in, the BN constants rebuilt inside the jitted
          function (`folding.restore_batchnorm`) so XLA folds them away: no BN ops and
          fewer arguments.
The student runs with each depthwise form: "conv" (XLA's grouped convolution), "shifted"
(`mobilenet_v2.DepthwiseConv`), and "auto" resolves to one of them on this backend.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import training
from compressjax.models import folding
from compressjax.models import mobilenet_v2
from compressjax.models import resnet

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from experiments import vision_kd_lora_int8  # pylint: disable=wrong-import-position

BATCHES = (1, 256)


def models():
  """The default "cpu" config's teacher and student (10 classes), and the image shape."""
  c = vision_kd_lora_int8.get_config("cpu")
  teacher = resnet.ResNet(stage_sizes=tuple(c.teacher.stage_sizes), num_classes=10,
                          width=c.teacher.width)
  student = mobilenet_v2.MobileNetV2(10, c.student.width_multiplier,
                                     depthwise_impl=c.student.depthwise_impl)
  return teacher, student, (c.image_size, c.image_size, 3)


def random_variables(model, shape, seed):
  """Initialized variables with random BN statistics (so folding changes every kernel)."""
  v = model.init(jax.random.key(seed), jnp.zeros((1, *shape)), train=False)
  rng = np.random.default_rng(seed)
  draw = lambda path, a: jnp.asarray(
      rng.uniform(0.5, 1.5, a.shape) if jax.tree_util.keystr(path).endswith("['var']")
      else rng.normal(0.0, 0.1, a.shape), a.dtype)
  return {**v, "batch_stats": jax.tree_util.tree_map_with_path(draw, v["batch_stats"])}


def served(model, variables):
  """``(fn, stored)``: the jitted folded form and the tree it takes (see the module doc)."""
  stored = folding.strip_batchnorm(folding.fold_batchnorm(variables, model.bn_epsilon),
                                   model.bn_epsilon)
  like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
  fn = jax.jit(lambda s, x: model.apply(folding.restore_batchnorm(s, like, model.bn_epsilon),
                                        x, train=False))
  return fn, stored


def variants(teacher, student, shape):
  """name -> (jitted fn, variables): every form timed, the reference first."""
  tv, sv = random_variables(teacher, shape, 0), random_variables(student, shape, 1)
  bn = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=False))
  out = {"teacher bn": (bn(teacher), tv), "teacher bn (A/A copy)": (bn(teacher), tv),
         "teacher folded": served(teacher, tv)}
  for impl in ("conv", "shifted"):
    s = student.clone(depthwise_impl=impl)
    out[f"student {impl} bn"] = (bn(s), sv)
    out[f"student {impl} folded"] = served(s, sv)
  return out


def check_equal(forms, x):
  """Every form of one model gives the same logits (float32 rounding aside)."""
  logits = {name: np.asarray(fn(v, x)) for name, (fn, v) in forms.items()}
  for name, got in logits.items():
    ref = logits["teacher bn" if name.startswith("teacher") else "student conv bn"]
    assert np.abs(ref).max() > 0, name  # not a dead network
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                               err_msg=name)


def thunk_kinds(fn, *args) -> tuple[int, dict[str, str]]:
  """``(arguments, {instruction: kind})`` of the entry computation of ``fn``'s CPU program."""
  text = fn.lower(*args).compile().as_text()
  entry = text[text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}")]
  weights, kinds, arguments = set(), {}, 0
  for line in entry.splitlines()[1:]:
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\((.*)$", line)
    if not m:
      continue
    name, op, rest = m.groups()
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    if op in ("parameter", "constant"):
      weights.add(name)
      arguments += op == "parameter"
    elif op == "fusion" and "kind=kCustom" in rest:
      kinds[name] = "YNNPACK fusion (dot, 1x1 or grouped conv)"
    elif op == "fusion" and _weights_only(operands, weights):
      kinds[name] = "fusion of weights only (BN consts, kernel prep)"
    elif op == "fusion":
      kinds[name] = "elementwise fusion (BN, ReLU6, shifted dw)"
    elif op not in ("bitcast", "tuple", "get-tuple-element"):
      kinds[name] = op
  return arguments, kinds


def _weights_only(operands, weights) -> bool:
  """Whether every operand is a weight or constant (not computed from the input)."""
  return all(o in weights for o in operands)


def profile(forms, x, calls, walls):
  """Prints, per form, its arguments and per-call thunk counts and busy time by kind.

  ``walls`` (form -> median seconds, untraced) splits each call into the thunks' busy time,
  the argument handling (a jitted no-op taking the same variables) and the rest (thunk
  dispatch and scheduling, the profiler's own cost).
  """
  noop = jax.jit(lambda v, x: x[:1, 0, 0, :1])
  print(f"{'form':<24}{'args':>5}{'wall us':>9}{'no-op us':>9}  thunks by kind: count, busy "
        f"us per call (traced)")
  for name, (fn, v) in forms.items():
    arguments, kinds = thunk_kinds(fn, v, x)
    arg_cost = training.latency(noop, v, x, repeats=50 if x.shape[0] == 1 else 5)
    jax.block_until_ready(fn(v, x))
    with tempfile.TemporaryDirectory() as d:
      with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(calls):
          jax.block_until_ready(fn(v, x))
      traces = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
      events = []
      if traces:
        with gzip.open(traces[0]) as f:
          events = json.load(f)["traceEvents"]
    busy = collections.defaultdict(float)
    for e in events:
      if e.get("ph") == "X" and e.get("name") in kinds:
        busy[kinds[e["name"]]] += e["dur"] / calls
    count = collections.Counter(kinds.values())
    print(f"{name:<24}{arguments:>5}{1e6 * walls[name]:>9.0f}{1e6 * arg_cost:>9.0f}  "
          f"{len(kinds)} thunks, busy {sum(busy.values()):.0f} us")
    for kind, n in count.most_common():
      print(f"{'':<49}{n:>4} x {kind:<46}{busy[kind]:>9.0f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=0,
                      help="timed rounds per batch (0: 200 at batch 1, 8 at batch 256)")
  parser.add_argument("--profile", action="store_true",
                      help="also profile every form (thunks by kind, busy time)")
  args = parser.parse_args()
  teacher, student, shape = models()
  auto = mobilenet_v2.resolve_depthwise_impl(student.depthwise_impl)
  print(f"backend {jax.default_backend()}; teacher ResNet-18 w{teacher.width}, student "
        f"MobileNetV2 x{student.width_multiplier:g} (depthwise_impl={student.depthwise_impl!r}"
        f" -> {auto!r}), inputs {shape}")
  forms = variants(teacher, student, shape)
  rng = np.random.default_rng(0)
  for batch in BATCHES:
    x = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    check_equal(forms, x)
    rounds = args.rounds or (200 if batch == 1 else 8)
    t0 = time.perf_counter()
    times = training.interleaved_latency([(fn, (v, x)) for fn, v in forms.values()],
                                         rounds=rounds)
    col = dict(zip(forms, times.T))
    print(f"\nbatch {batch}: {rounds} interleaved rounds ({time.perf_counter() - t0:.0f} s)")
    print(f"{'form':<24}{'median ms':>10}  {'/ teacher bn  p10 p50 p90':>27}  "
          f"{'/ teacher folded  p10 p50 p90':>31}")
    for name, t in col.items():
      r = [np.percentile(t / col[ref], [10, 50, 90]) for ref in ("teacher bn",
                                                                    "teacher folded")]
      print(f"{name:<24}{1e3 * np.median(t):>10.3f}  {'':>9}" + " ".join(
          f"{v:5.2f}" for v in r[0]) + f"  {'':>13}" + " ".join(f"{v:5.2f}" for v in r[1]))
    pct = lambda a, b: "{:.2f} [{:.2f}, {:.2f}]".format(
        *np.percentile(col[a] / col[b], [50, 10, 90]))
    print(f"served student ({auto}, folded) / teacher folded: "
          f"{pct(f'student {auto} folded', 'teacher folded')}; as the study times them "
          f"(bn, student 'conv'): {pct('student conv bn', 'teacher bn')}; teacher A/A: "
          f"{pct('teacher bn (A/A copy)', 'teacher bn')}")
    if args.profile:
      print(f"\nprofile at batch {batch}:")
      profile(forms, x, 20 if batch == 1 else 2, {k: np.median(t) for k, t in col.items()})


if __name__ == "__main__":
  main()
