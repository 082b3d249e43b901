"""Measuring a wireless stage: every metric on the fixed frames, the references, the report.

Every model of a study, and the classical receivers beside it, is measured on the same
frames: `evaluation_set` draws ``frames_per_point`` frames per task at each Es/N0 point of
the `EvalPlan` from a fixed key. `measure` gives a stage's record (accuracy, F1, SER per
point with its 95% interval, the Es/N0 at each of `SER_TARGETS`, NMSE, the real exported
bytes, FLOPs; latency is timed for all rows together); `add_losses` turns the Es/N0 into
a loss in dB against the seed's teacher; `references` runs LS, LMMSE, perfect CSI and the
classifier that knows the channel; `COLUMNS`, `legend` and `footer` make ``results.md``.
The functions take the resolved pieces of `compressjax.studies.wireless.Plan`, never the
config.
"""

import functools
from typing import Any, NamedTuple

import jax
import numpy as np

from compressjax import quantization
from compressjax import reporting
from compressjax import selection
from compressjax import serving
from compressjax import training
from compressjax.channels import ChannelConfig
from compressjax.models import iq_transformer

_EVAL_KEY = 20261123  # fixed: every stage and every seed is measured on the same frames
SER_TARGETS = (1e-1, 1e-2)   # the SERs at which each receiver's Es/N0 is read off


class EvalPlan(NamedTuple):
  """How every model is measured (a wireless config's ``eval`` block, resolved).

  Attributes:
    snr_points: the Es/N0 points (dB), at least two, increasing.
    frames_per_point: frames per task at each point (a multiple of ``batch_size``).
    batch_size: frames per task per evaluation batch.
    latency_batch: frames in the batch whose latency is timed.
    latency_repeats: timed calls per latency.
    high_snr_db: "mod. acc >= hi" averages the points at or above this Es/N0 (dB).
  """
  snr_points: tuple[float, ...]
  frames_per_point: int
  batch_size: int
  latency_batch: int
  latency_repeats: int
  high_snr_db: float


def _model(cfg):
  return iq_transformer.IQTransformer(cfg)


def float_nbytes(params: Any) -> int:
  """Bytes of a float32 model as the export stores it (sparse tensors as bitmask + values)."""
  return quantization.nbytes(quantization.export(params, None))


def snr_summary(snr_db: list, rates: list) -> dict[str, Any]:
  """The Es/N0 (dB) at which a SER curve reaches each of `SER_TARGETS` (None: not reached)."""
  return {f"snr_at_{t:.0e}": training.metrics.snr_at(snr_db, rates, t) for t in SER_TARGETS}


@functools.lru_cache(maxsize=None)
def _predict(model_cfg: Any) -> Any:
  """The jitted predict of an architecture: every stage of one architecture reuses its
  compiled program (the served apply is `serving`'s, cached the same way)."""
  return training.make_predict_fn(training.multitask_forward(_model(model_cfg).apply))


def served(model_cfg: iq_transformer.IQTransformerConfig, params: Any,
           spec: Any = None, where: Any = None) -> serving.Served:
  """A stage's served form (`serving.serve`): structured pruning materialized, quantized
  leaves (``where``, default the kernels; ``spec`` a `Spec` or per-path) as integer codes
  dequantized in the jitted apply (one compile per architecture)."""
  return serving.serve(iq_transformer.IQTransformer, model_cfg, params, spec,
                       config_from_params=iq_transformer.config_from_params, where=where)


def measure(e: EvalPlan, channel: ChannelConfig, model_cfg: iq_transformer.IQTransformerConfig,
            params: Any, eval_batches: list, spec: Any = None,
            where: Any = None) -> dict[str, Any]:
  """Every metric of one model on the fixed evaluation batches (the same code for all).

  Args:
    e: how to measure.
    channel: the link (its modulations name the classes).
    model_cfg: the model's architecture.
    params: its params.
    eval_batches: `evaluation_set`'s batches.
    spec: the quantizer its weights lie on (bytes of the quantized export): a `Spec`, a
      per-path spec (a budget stage's mixed precision), or None for a float model.
    where: the leaves ``spec`` covers (default: the kernels).

  Returns:
    The stage's metrics record.
  """
  predict = _predict(model_cfg)
  edges = training.evaluation.point_edges(e.snr_points)
  ev = training.evaluate(predict, {"params": params}, eval_batches,
                         modulation=channel.modulation,
                         num_classes=len(channel.modulations), snr_edges=edges)
  packed = quantization.export(params, spec, where=where)
  counts = training.param_counts(params)
  # Latency is timed for every row of a seed together, interleaved (`engine.time_rows`).
  sv = served(model_cfg, params, spec, where)
  rec = {"params_total": counts["params"], "params_nonzero": counts["nonzero"],
         "bytes": quantization.nbytes(packed),
         "bytes_entropy": quantization.encoded_nbytes(packed),
         "flops": training.flops(sv.apply, sv.variables, latency_sample(e, eval_batches, 1)),
         "served": sv.form,
         "sparsity": _kernel_sparsity(params),
         "bits": 32 if spec is None else spec.bits if isinstance(spec, quantization.Spec)
         else "per layer"}
  if "modulation" in ev:
    m = ev["modulation"]
    by_snr = m["accuracy_by_snr"]
    high = [a for p, a in zip(by_snr["snr_db"], by_snr["accuracy"])
            if p >= e.high_snr_db and a is not None]
    rec.update(accuracy=m["accuracy"], f1=m["macro_f1"], precision=m["macro_precision"],
               recall=m["macro_recall"], confusion=m["confusion"],
               accuracy_high_snr=float(np.mean(high)) if high else None,
               accuracy_curve={"snr_db": by_snr["snr_db"], "model": by_snr["accuracy"]})
  if "symbols" in ev:
    s = ev["symbols"]["ser_by_snr"]
    rec.update(ser_mean=ev["symbols"]["ser"], ber_mean=ev["symbols"]["ber"],
               ser={"snr_db": s["snr_db"], "model": s["rate"]},
               ser_interval={"lo": s["lo"], "hi": s["hi"]}, ser_top=s["rate"][-1],
               **snr_summary(s["snr_db"], s["rate"]))
  if "channel" in ev:
    rec.update(nmse_db=ev["channel"]["nmse_db"])
  rec["eval"] = ev
  return rec


def add_losses(records: list[dict[str, Any]]) -> None:
  """Adds each record's loss in dB against its seed's teacher at each SER target.

  ``loss_db_<t>`` = Es/N0 the stage needs for SER t minus what the teacher needs (positive:
  the stage needs more SNR); None where either never reaches t on the evaluated points.
  """
  teachers = {r["seed"]: r for r in records if r["name"] == "teacher"}
  for r in records:
    t = teachers.get(r["seed"])
    for target in SER_TARGETS:
      key = f"snr_at_{target:.0e}"
      ok = t is not None and r.get(key) is not None and t.get(key) is not None
      r[f"loss_db_{target:.0e}"] = r[key] - t[key] if ok else None


def _kernel_sparsity(params: Any) -> float:
  """Fraction of zeros over the kernels the transforms select by default."""
  flags = jax.tree.leaves(selection.select(params))
  leaves = jax.tree.leaves(params)
  kernels = [np.asarray(x) for x, on in zip(leaves, flags) if on]
  total = sum(k.size for k in kernels)
  return float(sum(k.size - np.count_nonzero(k) for k in kernels) / max(total, 1))


def references(e: EvalPlan, channel: ChannelConfig, tasks: tuple[str, ...],
               eval_batches: list) -> dict[str, Any]:
  """The classical references on the evaluation frames.

  Args:
    e: how to measure.
    channel: the link (the LMMSE prior: its mean tap powers).
    tasks: the tasks the run trains.
    eval_batches: `evaluation_set`'s batches.

  Returns:
    ``{"ser": {receiver: SER curve}, "summary": {receiver: {"ser_top", "snr_at_..."}},
    "accuracy": {"known_channel": accuracy curve}, "accuracy_high_snr": {...}}`` for the
    tasks the run trains.
  """
  edges = training.evaluation.point_edges(e.snr_points)
  out = {"ser": {}, "summary": {}, "accuracy": {}, "accuracy_high_snr": {}}
  if "symbols" in tasks:
    refs = training.reference_receivers(eval_batches, modulation=channel.modulation,
                                        snr_edges=edges, tap_powers=channel.tap_powers)
    for name, r in refs.items():
      curve = r["ser_by_snr"]
      out["ser"][name] = curve["rate"]
      out["summary"][name] = {"ser_top": curve["rate"][-1],
                              **snr_summary(curve["snr_db"], curve["rate"])}
  if "modulation" in tasks:
    acc = training.evaluation.reference_classifier(
        eval_batches, modulations=channel.modulations, snr_edges=edges)["accuracy_by_snr"]
    out["accuracy"]["known_channel"] = acc["accuracy"]
    high = [a for p, a in zip(acc["snr_db"], acc["accuracy"]) if p >= e.high_snr_db]
    out["accuracy_high_snr"]["known_channel"] = float(np.mean(high)) if high else None
  return out


def evaluation_set(e: EvalPlan, channel: ChannelConfig, tasks: tuple[str, ...]) -> list:
  """The fixed evaluation frames: ``e.frames_per_point`` per task at each Es/N0 point.

  Args:
    e: the points, frames and batch size.
    channel: the link the frames go through.
    tasks: the tasks whose frames are drawn.

  Returns:
    The batches (the same frames for every model of the study and every seed).
  """
  at = lambda snr: training.multitask_data_fn(
      training.evaluation.with_snr(channel, snr), e.batch_size, tasks)
  return training.evaluation.snr_point_batches(at, jax.random.key(_EVAL_KEY), e.snr_points,
                                               e.frames_per_point // e.batch_size)

# (record key, column title, format) of the wireless study's results.md.
COLUMNS = (
    ("name", "stage", "{}"),
    ("accuracy", "mod. acc", "{:.3f}"),
    ("accuracy_high_snr", "mod. acc >= hi", "{:.3f}"),
    ("f1", "macro F1", "{:.3f}"),
    ("ser_top", "SER @ top", "{:.4f}"),
    ("snr_at_1e-01", "Es/N0 @ 1e-1", "{:.2f}"),
    ("loss_db_1e-01", "loss dB @ 1e-1", "{:+.2f}"),
    ("snr_at_1e-02", "Es/N0 @ 1e-2", "{:.2f}"),
    ("loss_db_1e-02", "loss dB @ 1e-2", "{:+.2f}"),
    ("nmse_db", "NMSE dB", "{:.2f}"),
    ("params_nonzero", "non-zero", "{:,.0f}"),
    ("bytes", "bytes", "{:,.0f}"),
    ("compression", "x smaller", "{:.2f}"),
    ("bytes_entropy", "bytes (entropy-coded)", "{:,.0f}"),
    ("compression_entropy", "x smaller (entropy)", "{:.2f}"),
    ("flops", "FLOPs / frame", "{:.3g}"),
    ("latency_ms", "latency ms", "{:.3f}"),
    ("latency_text", "latency / teacher", "{}"),
    ("latency1_text", "latency / teacher @ 1", "{}"),
    ("served", "served as", "{}"),
)


def legend(e: "EvalPlan") -> dict[str, str]:
  """What each of `COLUMNS` measures: task, unit, the frames it averages over."""
  frames = (f"{e.frames_per_point} frames per Es/N0 point, {len(e.snr_points)} points from "
            f"{e.snr_points[0]:g} to {e.snr_points[-1]:g} dB")
  return {
      "name": "the stage: 'teacher', or '<pipeline>/<i>_<kind>' (a row 'same_as' another "
              "is that stage, shared by two pipelines)",
      "accuracy": f"modulation task: classification accuracy (a fraction) over {frames}",
      "accuracy_high_snr": f"modulation task: accuracy over the points at Es/N0 >= "
                           f"{e.high_snr_db:g} dB",
      "f1": "modulation task: macro-averaged F1 over the modulation classes, same frames",
      "ser_top": f"symbols task: symbol error rate at the top point ({e.snr_points[-1]:g} dB), "
                 f"over the payload symbols of {e.frames_per_point} frames",
      "snr_at_1e-01": "symbols task: the Es/N0 (dB) at which the SER curve reaches 1e-1 "
                      "(log-interpolated between points; '-' if never reached)",
      "loss_db_1e-01": "the stage's Es/N0 at SER 1e-1 minus the teacher's (dB; positive: "
                       "the stage needs more signal)",
      "snr_at_1e-02": "symbols task: the Es/N0 (dB) at which the SER reaches 1e-2",
      "loss_db_1e-02": "the stage's Es/N0 at SER 1e-2 minus the teacher's (dB)",
      "nmse_db": f"channel task: normalized mean squared error of the tap estimates (dB), "
                 f"over {frames}",
      "params_nonzero": "parameters that are not exactly zero",
      "bytes": "bytes of the packed export: quantized kernels as integer codes plus their "
               "scales, the rest float32; sparse tensors as a bitmask plus the non-zero "
               "values",
      "compression": "the teacher's bytes / the stage's bytes",
      "bytes_entropy": "bytes of the same export entropy-coded (quantization.encode: rANS "
                       "over the integer codes and the sparsity mask, names included)",
      "compression_entropy": "the teacher's (plain) bytes / the stage's entropy-coded "
                             "bytes",
      "flops": "XLA's FLOP count of one forward pass of the served model on one frame "
               "(removed heads and MLP units are not counted; zeros in dense kernels are)",
      "latency_ms": f"median wall time of one jitted forward pass of the served model on "
                    f"the eval batch ({e.batch_size} frames, ms), over {e.latency_repeats} "
                    f"rounds on this device, every row of a seed timed in the same "
                    f"interleaved rounds",
      "latency_text": f"the served model's latency / the teacher's at the eval batch "
                      f"({e.batch_size} frames): the median per-round ratio and its 10th "
                      f"and 90th percentiles; 'noisy' when those cover 1",
      "latency1_text": f"the same at a batch of {e.latency_batch} frame(s)",
      "served": "the served form timed (compressjax/serving.py): 'materialized' removes "
                "pruned heads and MLP units; integer codes are dequantized inside the "
                "jitted function; zeros of unstructured pruning stay in dense kernels, "
                "since XLA has no sparse kernel to exploit them",
  }


def latency_sample(e: "EvalPlan", eval_batches: list, frames: int | None = None) -> Any:
  """The first ``frames`` frames (default: the eval batch) of one task's first batch."""
  first_task = sorted(eval_batches[0])[0]
  return eval_batches[0][first_task].iq[:e.batch_size if frames is None else frames]


def _db(x):
  return "not reached" if x is None else f"{x:.2f} dB"


def footer(e: EvalPlan, refs: dict[str, Any], records: list[dict[str, Any]],
           table: list[dict[str, Any]], compare: tuple[str, ...] = (),
           final_rows: dict[str, str] | None = None) -> str:
  """results.md below the table: the references, the teacher's gaps, the paired answer.

  Args:
    e: how the rows were measured.
    refs: `references`'s output.
    records: every stage's record (every seed).
    table: the rows of the table (``records``, or their aggregate over seeds).
    compare: () or the two pipelines whose final rows are compared seed by seed.
    final_rows: each pipeline's final row name (``"P-Q-KD/3_distill:inherit"``); the
      ``"control"`` pipeline's, if any, is described beside the comparison.

  Returns:
    The markdown text.
  """
  pts = e.snr_points
  lines = ["", f"Evaluated at Es/N0 = {pts[0]:g} to {pts[-1]:g} dB ({len(pts)} points, "
           f"{e.frames_per_point} frames per task per point, the same frames for every row); "
           f"'top' is {pts[-1]:g} dB, 'hi' is Es/N0 >= {e.high_snr_db:g} dB.", ""]
  summary = refs.get("summary", {})
  if summary:
    lines += ["| reference | SER @ top | Es/N0 @ 1e-1 | Es/N0 @ 1e-2 |", "|---|---|---|---|"]
    for name, r in summary.items():
      lines.append(f"| {name} | {r['ser_top']:.4f} | {_db(r['snr_at_1e-01'])} | "
                   f"{_db(r['snr_at_1e-02'])} |")
    lines.append("")
  acc = refs.get("accuracy_high_snr", {}).get("known_channel")
  if acc is not None:
    lines += [f"Modulation classifier that knows the channel: accuracy {acc:.3f} at "
              f"Es/N0 >= {e.high_snr_db:g} dB.", ""]
  teacher = next((r for r in table if r["name"] == "teacher"), None)
  if teacher is not None and summary:
    gaps = []
    for ref in ("lmmse", "perfect_csi"):
      for t in SER_TARGETS:
        k = f"snr_at_{t:.0e}"
        if teacher.get(k) is not None and summary.get(ref, {}).get(k) is not None:
          gaps.append(f"{teacher[k] - summary[ref][k]:+.2f} dB vs {ref} at SER {t:g}")
    if gaps:
      lines += ["Teacher's gap (positive: it needs more Es/N0): " + "; ".join(gaps) + ".", ""]
  pair = tuple(compare)
  if len(pair) == 2:
    rows = final_rows or {}
    names = {r["name"] for r in records}
    finals = {name: rows[name] for name in pair + ("control",)
              if name in rows and rows[name] in names}
    if pair[0] in finals and pair[1] in finals:
      a, b = finals[pair[0]], finals[pair[1]]
      lines += [f"Paired differences {pair[0]} - {pair[1]} (same seed, same teacher; mean "
                f"and 95% t-interval over seeds):", ""]
      lines += ["| metric | mean | 95% interval | seeds | verdict |", "|---|---|---|---|---|"]
      for key, label, lower in (("loss_db_1e-01", "loss dB @ SER 1e-1", True),
                                ("loss_db_1e-02", "loss dB @ SER 1e-2", True),
                                ("accuracy", "modulation accuracy", False),
                                ("nmse_db", "channel NMSE dB", True)):
        d = reporting.paired_difference(records, a, b, key)
        if d is None:
          continue
        ci = "-" if d["lo"] is None else f"[{d['lo']:+.3f}, {d['hi']:+.3f}]"
        lines.append(f"| {label} | {d['mean']:+.3f} | {ci} | {d['n']} | "
                     f"{reporting.verdict(d, pair[0], pair[1], lower)} |")
      lines.append("")
      if "control" in finals:
        lines.append(f"Control: '{finals['control']}' is the teacher fine-tuned uncompressed "
                     f"for the same number of extra steps; its row separates what compression "
                     f"costs from what extra training gives.")
        lines.append("")
  return "\n".join(lines)
