"""Evaluation metrics in NumPy: classification scores, error rates per SNR bin, NMSE.

All functions take host arrays (``np.asarray`` of fetched predictions) and return
NumPy values or plain floats, ready for ``metrics.json``. Conventions follow
scikit-learn where it has the metric: confusion rows are true classes, columns
predicted; a precision or recall with a zero denominator is 0 (sklearn's
``zero_division=0``), and macro averages weigh every class equally.
"""

from typing import Any

import numpy as np


def confusion_matrix(labels: Any, preds: Any, num_classes: int) -> np.ndarray:
  """int64 [C, C] counts: entry (i, j) is how many examples of class i were predicted j.

  Args:
    labels: int true classes, any shape.
    preds: int predicted classes, same shape.
    num_classes: C.

  Returns:
    The confusion matrix.
  """
  labels = np.asarray(labels).ravel().astype(np.int64)
  preds = np.asarray(preds).ravel().astype(np.int64)
  if labels.shape != preds.shape:
    raise ValueError(f"preds must match labels' size {labels.size}, got {preds.size}")
  for field, x in (("labels", labels), ("preds", preds)):
    if x.size and (x.min() < 0 or x.max() >= num_classes):
      raise ValueError(f"{field} must be in [0, {num_classes}), got range "
                       f"[{x.min()}, {x.max()}]")
  return np.bincount(labels * num_classes + preds,
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(labels: Any, preds: Any) -> float:
  """Top-1 accuracy: the fraction of ``preds == labels``."""
  return float(np.mean(np.asarray(labels) == np.asarray(preds)))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  return np.where(den > 0, num / np.maximum(den, 1), 0.0)


def precision_recall_f1(confusion: Any) -> dict[str, Any]:
  """Per-class and macro precision, recall and F1 from a confusion matrix.

  precision_c = TP_c / (TP_c + FP_c), recall_c = TP_c / (TP_c + FN_c),
  F1_c = 2 P_c R_c / (P_c + R_c); macro scores are unweighted means over classes
  (Sokolova & Lapalme, "A systematic analysis of performance measures for
  classification tasks", 2009). Zero denominators give 0.

  Args:
    confusion: [C, C] counts, rows true, columns predicted.

  Returns:
    ``{"precision": [C], "recall": [C], "f1": [C], "macro_precision",
    "macro_recall", "macro_f1"}`` (floats for the macros).
  """
  cm = np.asarray(confusion, np.float64)
  tp = np.diag(cm)
  precision = _ratio(tp, cm.sum(axis=0))
  recall = _ratio(tp, cm.sum(axis=1))
  f1 = np.where(precision + recall > 0,
                2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
  return {"precision": precision, "recall": recall, "f1": f1,
          "macro_precision": float(precision.mean()), "macro_recall": float(recall.mean()),
          "macro_f1": float(f1.mean())}


def classification_report(labels: Any, preds: Any, num_classes: int) -> dict[str, Any]:
  """Accuracy, macro precision/recall/F1 and the confusion matrix, JSON-ready.

  Args:
    labels: int true classes.
    preds: int predicted classes.
    num_classes: C.

  Returns:
    ``{"accuracy", "macro_precision", "macro_recall", "macro_f1", "f1" (list),
    "confusion" (list of lists)}``.
  """
  cm = confusion_matrix(labels, preds, num_classes)
  scores = precision_recall_f1(cm)
  return {"accuracy": accuracy(labels, preds),
          "macro_precision": scores["macro_precision"],
          "macro_recall": scores["macro_recall"], "macro_f1": scores["macro_f1"],
          "f1": scores["f1"].tolist(), "confusion": cm.tolist()}


def snr_bin_index(snr_db: Any, edges: Any) -> np.ndarray:
  """int [N]: bin k holds ``edges[k] <= snr < edges[k+1]``; -1 outside (last edge closed)."""
  snr = np.asarray(snr_db, np.float64)
  edges = np.asarray(edges, np.float64)
  if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
    raise ValueError(f"edges must be >= 2 increasing values, got {edges.tolist()}")
  idx = np.searchsorted(edges, snr, side="right") - 1
  idx = np.where(snr == edges[-1], edges.size - 2, idx)
  return np.where((idx >= 0) & (idx < edges.size - 1), idx, -1)


def binned_rate(errors: Any, counts: Any, snr_db: Any, edges: Any) -> dict[str, Any]:
  """Error rate per SNR bin: sum of errors over sum of counts of the bin's examples.

  Args:
    errors: [N] errors per example (symbol or bit errors on data positions).
    counts: [N] opportunities per example (data symbols or bits).
    snr_db: [N] SNR of each example.
    edges: [K + 1] increasing bin edges in dB.

  Returns:
    ``{"snr_db": [K] bin centres, "rate": [K] (None for an empty bin, so the dict is
    strict JSON; ``np.asarray(rate, float)`` turns it into NaN), "count": [K]
    opportunities, "lo"/"hi": [K] its 95% interval over examples (`rate_interval`)}``
    as lists.
  """
  idx = snr_bin_index(snr_db, edges)
  k = len(edges) - 1
  errors = np.asarray(errors, np.float64)
  counts = np.asarray(counts, np.float64)
  keep = idx >= 0
  cnt = np.bincount(idx[keep], counts[keep], minlength=k)
  edges = np.asarray(edges, np.float64)
  rate, lo, hi = [], [], []
  for b in range(k):
    sel = idx == b
    r, l, h = rate_interval(errors[sel], counts[sel]) if cnt[b] > 0 else (None,) * 3
    rate.append(r), lo.append(l), hi.append(h)
  return {"snr_db": ((edges[:-1] + edges[1:]) / 2).tolist(), "rate": rate,
          "count": cnt.astype(np.int64).tolist(), "lo": lo, "hi": hi}


def rate_interval(errors: Any, counts: Any, z: float = 1.96) -> tuple[float, float, float]:
  """A rate over examples (frames) and its two-sided interval, counting frames, not symbols.

  The symbols of one frame share its channel, so their errors are not independent: the
  rate r = sum e_i / sum c_i is a ratio estimator over the F frames, whose standard error
  is sqrt(sum (e_i - r c_i)^2 / (F (F - 1))) / mean(c) (Cochran, Sampling Techniques,
  1977, Sec. 6.4). The interval is r +- z se, clipped to [0, 1]; with no error at all its
  upper end is the "rule of three", 3 / sum c (Hanley and Lippman-Hand, 1983; 95%).

  Args:
    errors: [F] errors per frame.
    counts: [F] opportunities per frame (> 0 in total).
    z: the normal quantile (1.96: 95%).

  Returns:
    ``(rate, lo, hi)`` as floats.
  """
  e = np.asarray(errors, np.float64).reshape(-1)
  c = np.asarray(counts, np.float64).reshape(-1)
  if e.shape != c.shape or c.sum() <= 0:
    raise ValueError(f"errors and counts must have one shape and counts a positive sum, got "
                     f"{e.shape}, {c.shape} with sum {c.sum()}")
  r = e.sum() / c.sum()
  f = e.size
  if e.sum() == 0:
    return 0.0, 0.0, float(min(1.0, 3.0 / c.sum()))
  se = np.sqrt(np.sum((e - r * c) ** 2) / max(f * (f - 1), 1)) / c.mean()
  return float(r), float(max(0.0, r - z * se)), float(min(1.0, r + z * se))


def snr_at(snr_db: Any, rates: Any, target: float) -> float | None:
  """The SNR (dB) where a falling error-rate curve crosses ``target``.

  Interpolates log10(rate) linearly in dB between the two points around the first
  crossing (error rates fall near-exponentially in dB, so this is the usual reading of a
  waterfall curve).

  Args:
    snr_db: [K] increasing SNR points.
    rates: [K] error rates (None or NaN for a missing point).
    target: the rate to reach, in (0, 1).

  Returns:
    The SNR in dB, or None when the curve never falls to ``target`` in the range or is
    already below it at the first point (the crossing is not bracketed).
  """
  if not 0 < target < 1:
    raise ValueError(f"target must be in (0, 1), got {target!r}")
  x = np.asarray(snr_db, np.float64)
  y = np.array([np.nan if v is None else v for v in rates], np.float64)
  ok = np.isfinite(y)
  x, y = x[ok], y[ok]
  below = np.nonzero(y <= target)[0]
  if below.size == 0 or below[0] == 0:
    return None
  i = below[0]
  lo_y, hi_y = np.log10(max(y[i], 1e-12)), np.log10(y[i - 1])
  frac = (hi_y - np.log10(target)) / (hi_y - lo_y) if hi_y > lo_y else 1.0
  return float(x[i - 1] + frac * (x[i] - x[i - 1]))


def error_counts(true: Any, pred: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
  """Per-example errors and opportunities over masked positions.

  Args:
    true: [N, ...] true symbols (or bits).
    pred: [N, ...] decisions, same shape.
    mask: broadcastable to ``true``; 1 where a position counts (data, not pilots).

  Returns:
    ``(errors [N], counts [N])``.
  """
  true, pred = np.asarray(true), np.asarray(pred)
  mask = np.broadcast_to(np.asarray(mask, np.float64), true.shape)
  axes = tuple(range(1, true.ndim))
  return ((true != pred) * mask).sum(axis=axes), mask.sum(axis=axes)


def nmse(estimate: Any, target: Any) -> float:
  """Normalized MSE ``sum |h_hat - h|^2 / sum |h|^2`` over all examples (linear).

  The ratio of sums (rather than a mean of per-example ratios) keeps deep fades with
  tiny ``|h|`` from dominating.

  Args:
    estimate: estimates (real or complex), any shape.
    target: true values, same shape.

  Returns:
    The NMSE; ``10 log10`` of it is the usual dB figure.
  """
  e = np.asarray(estimate, np.complex128 if np.iscomplexobj(estimate) else np.float64)
  t = np.asarray(target)
  return float(np.sum(np.abs(e - t) ** 2) / max(np.sum(np.abs(t) ** 2), 1e-300))


def to_db(x: float) -> float:
  """``10 log10(x)`` (-inf for 0)."""
  return float(10 * np.log10(x)) if x > 0 else float("-inf")
