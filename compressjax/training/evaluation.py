"""Evaluation on fixed batches: the model's three tasks and the classical references.

`make_eval_batches` draws the evaluation set once from a fixed key, so every pipeline
stage (and every reference receiver) is measured on exactly the same frames.
`evaluate` runs a model over it and reports, per task,

* modulation: top-1 accuracy, macro precision/recall/F1, the confusion matrix, and
  accuracy per SNR bin;
* symbols: SER and BER on data positions (pilots excluded), overall and per SNR bin;
* channel: NMSE of the channel head's taps, overall and per SNR bin (time-varying taps
  ``[B, L, T]`` are compared through their frame average, the block the head predicts).

`reference_receivers` runs LS + MMSE + ML, LMMSE + MMSE + ML and the perfect-CSI
detector (`compressjax.channels.receivers`) on the same symbol-task frames;
`reference_classifier` is the modulation task's upper line, a classifier that knows the
channel. `snr_point_batches` draws the evaluation set at fixed SNR points (each batch at
one point), so the per-bin curves above are curves at those points.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

from compressjax.channels import constellations
from compressjax.channels import receivers
from compressjax.training import metrics as metrics_lib

PredictFn = Callable[[Mapping[str, Any], Any], Mapping[str, Any]]


def make_eval_batches(data_fn: Callable[[chex.PRNGKey], Any], key: chex.PRNGKey,
                      num_batches: int) -> list[Any]:
  """Draws ``num_batches`` batch sets, batch ``i`` from ``fold_in(key, i)`` (on device).

  Args:
    data_fn: ``data_fn(key) -> batches``: a simulator's, drawing from the key alone
      (`compressjax.training.multitask.multitask_data_fn`).
    key: the fixed evaluation key (keep it apart from the training keys).
    num_batches: how many batch sets.

  Returns:
    A list of batch sets.
  """
  if not isinstance(num_batches, int) or num_batches < 1:
    raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
  draw = jax.jit(data_fn)
  return [draw(jax.random.fold_in(key, i)) for i in range(num_batches)]


def snr_point_batches(data_fn_at: Callable[[Any], Callable[[chex.PRNGKey], Any]],
                      key: chex.PRNGKey, points: Sequence[float],
                      chunks: int) -> list[Any]:
  """The evaluation set at fixed SNR points: ``chunks`` batch sets per point, in order.

  Args:
    data_fn_at: ``data_fn_at(snr_db) -> data_fn`` (e.g. ``multitask_data_fn`` of the
      channel config with ``snr_db`` replaced); every example of its batches has that SNR.
    key: the fixed evaluation key; point i, chunk j draws from ``fold_in(fold_in(key, i),
      j)``.
    points: the SNR points in dB, increasing.
    chunks: batch sets per point (frames per point = chunks x the data_fn's batch).

  Returns:
    A list of ``len(points) * chunks`` batch sets.
  """
  if not isinstance(chunks, int) or chunks < 1:
    raise ValueError(f"chunks must be an int >= 1, got {chunks!r}")
  points = [float(p) for p in points]
  if not points or any(b <= a for a, b in zip(points, points[1:])):
    raise ValueError(f"points must be increasing SNR values, got {points}")
  out = []
  for i, p in enumerate(points):
    draw = data_fn_at(p)
    out += [draw(jax.random.fold_in(jax.random.fold_in(key, i), j)) for j in range(chunks)]
  return out


def point_edges(points: Sequence[float]) -> tuple[float, ...]:
  """Bin edges that put each SNR point alone in its bin (midpoints, half a gap outside)."""
  p = np.asarray(points, np.float64)
  if p.ndim != 1 or p.size < 1 or np.any(np.diff(p) <= 0):
    raise ValueError(f"points must be increasing SNR values, got {p.tolist()}")
  gap = float(np.min(np.diff(p))) if p.size > 1 else 1.0
  mids = (p[:-1] + p[1:]) / 2
  return tuple([float(p[0] - gap / 2), *mids.tolist(), float(p[-1] + gap / 2)])


def with_snr(cfg: Any, snr_db: float) -> Any:
  """``cfg`` (a ``ChannelConfig``) at one fixed SNR."""
  return dataclasses.replace(cfg, snr_db=float(snr_db))


def _host_batches(eval_batches: Sequence[Mapping[str, Any]], task: str) -> Any:
  """One host Batch of ``task`` over all evaluation batches (concatenated on axis 0)."""
  parts = [jax.device_get(b[task]) for b in eval_batches]
  cat = {}
  for field in parts[0]._fields:
    values = [np.asarray(getattr(p, field)) for p in parts]
    # The pilot mask may be one [L] row shared by the batch: it is not concatenated.
    shared = field == "pilot_mask" and values[0].ndim == 1
    cat[field] = values[0] if shared else np.concatenate(values, axis=0)
  return parts[0]._replace(**cat)


def _data_mask(batch: Any) -> np.ndarray:
  return np.broadcast_to(~np.asarray(batch.pilot_mask), batch.symbols.shape)


def _block_taps(taps: np.ndarray) -> np.ndarray:
  return taps if taps.ndim == 2 else taps.mean(axis=1)


def _symbol_report(pred: np.ndarray, batch: Any, modulation: str, edges: Any) -> dict:
  mask = _data_mask(batch)
  table = constellations.bit_table(modulation)
  s_err, s_cnt = metrics_lib.error_counts(batch.symbols, pred, mask)
  b_err, b_cnt = metrics_lib.error_counts(batch.bits, table[pred], mask[..., None])
  return {"ser": float(s_err.sum() / max(s_cnt.sum(), 1)),
          "ber": float(b_err.sum() / max(b_cnt.sum(), 1)),
          "ser_by_snr": metrics_lib.binned_rate(s_err, s_cnt, batch.snr_db, edges),
          "ber_by_snr": metrics_lib.binned_rate(b_err, b_cnt, batch.snr_db, edges)}


def _nmse_report(est: np.ndarray, taps: np.ndarray, snr_db: np.ndarray, edges: Any) -> dict:
  sq = np.sum(np.abs(est - taps) ** 2, axis=-1)
  power = np.sum(np.abs(taps) ** 2, axis=-1)
  value = metrics_lib.nmse(est, taps)
  by_snr = metrics_lib.binned_rate(sq, power, snr_db, edges)
  by_snr["nmse"] = by_snr.pop("rate")
  return {"nmse": value, "nmse_db": metrics_lib.to_db(value), "nmse_by_snr": by_snr}


def evaluate(predict_fn: PredictFn, variables: Mapping[str, Any],
             eval_batches: Sequence[Mapping[str, Any]], *, modulation: str,
             num_classes: int, snr_edges: Any) -> dict[str, Any]:
  """Measures a model on the fixed evaluation batches.

  Args:
    predict_fn: jitted ``predict(variables, batches) -> {task: head output}`` (from
      ``make_predict_fn(multitask_forward(model.apply))``).
    variables: the model's variables (``TrainState.variables()``).
    eval_batches: from `make_eval_batches`; a list of ``{task: Batch}``.
    modulation: the symbol task's constellation (``ChannelConfig.modulation``).
    num_classes: classes of the modulation task (``len(cfg.modulations)``).
    snr_edges: SNR bin edges in dB for the per-SNR curves.

  Returns:
    A JSON-ready dict ``{task: {metric: value}}`` for the tasks present.
  """
  constellations.check_modulation(modulation)
  outputs = [jax.device_get(predict_fn(variables, b)) for b in eval_batches]
  tasks = sorted(eval_batches[0])
  report = {}
  for task in tasks:
    batch = _host_batches(eval_batches, task)
    out = np.concatenate([o[task] for o in outputs], axis=0)
    if task == "modulation":
      pred = out.argmax(-1)
      rep = metrics_lib.classification_report(batch.label, pred, num_classes)
      correct = (pred == batch.label).astype(np.float64)
      acc = metrics_lib.binned_rate(correct, np.ones_like(correct), batch.snr_db, snr_edges)
      acc["accuracy"] = acc.pop("rate")
      report[task] = {**rep, "accuracy_by_snr": acc}
    elif task == "symbols":
      if out.shape[-1] != constellations.order(modulation):
        raise ValueError(f"modulation must have as many points as the symbol head's "
                         f"{out.shape[-1]} logits, got {modulation!r}")
      report[task] = _symbol_report(out.argmax(-1), batch, modulation, snr_edges)
    elif task == "channel":
      est = out[..., 0] + 1j * out[..., 1]
      report[task] = _nmse_report(est, _block_taps(batch.taps), batch.snr_db, snr_edges)
  return report


def reference_receivers(eval_batches: Sequence[Mapping[str, Any]], *, modulation: str,
                        snr_edges: Any, x_pilot: Any = None,
                        tap_powers: Any = None) -> dict[str, Any]:
  """SER/BER (and tap NMSE) of the classical receivers on the symbol-task frames.

  Receivers: ``ls`` (LS taps from the preamble, MMSE equalization, per-symbol ML),
  ``lmmse`` (LMMSE taps with prior ``tap_powers``, same back end) and ``perfect_csi``
  (true taps; exact ML when flat, MMSE + ML otherwise; see
  `compressjax.channels.receivers.equalize_and_detect`).

  Args:
    eval_batches: from `make_eval_batches`; must include the "symbols" task.
    modulation: the constellation of the symbol task.
    snr_edges: SNR bin edges in dB.
    x_pilot: complex [P] preamble; None takes ``channels.pilot_symbols(P)`` with P the
      number of pilot positions.
    tap_powers: float [T] prior mean tap powers for LMMSE (e.g. from
      ``channels.fading.mean_tap_powers``); None uses the mean ``|h_t|^2`` of the
      evaluation frames (the prior an LMMSE receiver would estimate offline).

  Returns:
    ``{receiver: {"ser", "ber", "ser_by_snr", "ber_by_snr"[, "nmse", "nmse_db",
    "nmse_by_snr"]}}``.
  """
  constellations.check_modulation(modulation)
  if "symbols" not in eval_batches[0]:
    raise ValueError(f"eval_batches must hold the 'symbols' task, got {sorted(eval_batches[0])}")
  batch = _host_batches(eval_batches, "symbols")
  num_pilots = int(np.asarray(batch.pilot_mask).reshape(-1, batch.symbols.shape[-1])[0].sum())
  if x_pilot is None:
    from compressjax.channels.simulate import pilot_symbols  # pylint: disable=g-import-not-at-top
    x_pilot = pilot_symbols(num_pilots)
  x_pilot = jnp.asarray(x_pilot, jnp.complex64)
  if x_pilot.shape != (num_pilots,):
    raise ValueError(f"x_pilot must have shape ({num_pilots},), got {x_pilot.shape}")
  taps = np.asarray(batch.taps)
  block = _block_taps(taps)
  num_taps = block.shape[-1]
  if tap_powers is None:
    tap_powers = np.mean(np.abs(block) ** 2, axis=0)
  tap_powers = jnp.asarray(tap_powers, jnp.float32)
  if tap_powers.shape != (num_taps,):
    raise ValueError(f"tap_powers must have shape ({num_taps},), got {tap_powers.shape}")
  y = jnp.asarray(batch.iq[..., 0] + 1j * batch.iq[..., 1], jnp.complex64)
  nv = jnp.asarray(batch.noise_var, jnp.float32)
  run = {
      "ls": lambda y, h, n: receivers.ls_receiver(y, x_pilot, num_taps, n, modulation),
      "lmmse": lambda y, h, n: receivers.lmmse_receiver(y, x_pilot, tap_powers, n,
                                                        modulation),
      "perfect_csi": lambda y, h, n: receivers.equalize_and_detect(y, h, n, modulation),
  }
  report = {}
  for name, fn in run.items():
    out = jax.device_get(jax.jit(jax.vmap(fn))(y, jnp.asarray(taps, jnp.complex64), nv))
    rep = _symbol_report(np.asarray(out.symbols), batch, modulation, snr_edges)
    if name != "perfect_csi":
      rep.update(_nmse_report(np.asarray(out.taps), block, batch.snr_db, snr_edges))
    report[name] = rep
  return report


def reference_classifier(eval_batches: Sequence[Mapping[str, Any]], *,
                         modulations: Sequence[str], snr_edges: Any) -> dict[str, Any]:
  """Accuracy of a modulation classifier that knows the channel: the task's upper line.

  Each frame is MMSE-equalized with its TRUE taps and noise variance
  (`receivers.equalize_and_detect`), and the class is the constellation of highest
  likelihood of the data positions, treating the equalizer output as x + CN(0, 1 / SINR):
  argmax_c sum_n log((1 / M_c) sum_{s in S_c} exp(-SINR_n |x_hat_n - s|^2)). Data positions
  are those outside ``pilot_mask`` (the preamble is known to every class alike).

  Args:
    eval_batches: from `make_eval_batches` or `snr_point_batches`; must include the
      "modulation" task.
    modulations: the class names, in label order (``ChannelConfig.modulations``).
    snr_edges: SNR bin edges in dB.

  Returns:
    ``{"accuracy", "accuracy_by_snr"}`` as `evaluate` reports them for a model.
  """
  if "modulation" not in eval_batches[0]:
    raise ValueError(f"eval_batches must hold the 'modulation' task, got "
                     f"{sorted(eval_batches[0])}")
  for m in modulations:
    constellations.check_modulation(m)
  batch = _host_batches(eval_batches, "modulation")
  y = jnp.asarray(batch.iq[..., 0] + 1j * batch.iq[..., 1], jnp.complex64)
  equalize = jax.jit(jax.vmap(lambda y, h, n: receivers.equalize_and_detect(y, h, n, "qpsk")))
  out = jax.device_get(equalize(y, jnp.asarray(batch.taps, jnp.complex64),
                                jnp.asarray(batch.noise_var, jnp.float32)))
  x_hat, sinr = np.asarray(out.x_hat, np.complex128), np.asarray(out.sinr, np.float64)
  data = _data_mask(batch).astype(np.float64)
  scores = []
  for m in modulations:
    pts = np.asarray(constellations.constellation(m), np.complex128)
    d = -sinr[..., None] * np.abs(x_hat[..., None] - pts) ** 2           # [F, L, M]
    top = d.max(-1, keepdims=True)
    ll = (top[..., 0] + np.log(np.exp(d - top).mean(-1)))
    scores.append((ll * data).sum(-1))
  pred = np.argmax(np.stack(scores, -1), -1)
  correct = (pred == batch.label).astype(np.float64)
  acc = metrics_lib.binned_rate(correct, np.ones_like(correct), batch.snr_db, snr_edges)
  acc["accuracy"] = acc.pop("rate")
  return {"accuracy": float(correct.mean()), "accuracy_by_snr": acc}
