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
    opportunities}`` as lists.
  """
  idx = snr_bin_index(snr_db, edges)
  k = len(edges) - 1
  keep = idx >= 0
  err = np.bincount(idx[keep], np.asarray(errors, np.float64)[keep], minlength=k)
  cnt = np.bincount(idx[keep], np.asarray(counts, np.float64)[keep], minlength=k)
  edges = np.asarray(edges, np.float64)
  rate = [float(e / c) if c > 0 else None for e, c in zip(err, cnt)]
  return {"snr_db": ((edges[:-1] + edges[1:]) / 2).tolist(), "rate": rate,
          "count": cnt.astype(np.int64).tolist()}


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
