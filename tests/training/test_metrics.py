"""Tests of the evaluation metrics against hand-computed cases (and sklearn when present)."""

import numpy as np
import pytest

from compressjax.training import metrics

LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
PREDS = np.array([0, 1, 0, 1, 2, 2, 2, 0, 2, 1])


def test_confusion_matrix_by_hand():
  np.testing.assert_array_equal(metrics.confusion_matrix(LABELS, PREDS, 3),
                                [[2, 1, 0], [0, 1, 1], [1, 1, 3]])
  with pytest.raises(ValueError, match="preds must be in"):
    metrics.confusion_matrix(LABELS, PREDS + 1, 3)


def test_precision_recall_f1_by_hand():
  s = metrics.precision_recall_f1(metrics.confusion_matrix(LABELS, PREDS, 3))
  # Columns sum to (3, 3, 4) predictions, rows to (3, 2, 5) true examples.
  np.testing.assert_allclose(s["precision"], [2 / 3, 1 / 3, 3 / 4])
  np.testing.assert_allclose(s["recall"], [2 / 3, 1 / 2, 3 / 5])
  np.testing.assert_allclose(s["f1"], [2 / 3, 2 / 5, 2 / 3])
  np.testing.assert_allclose(s["macro_precision"], 7 / 12)
  np.testing.assert_allclose(s["macro_recall"], 53 / 90)
  np.testing.assert_allclose(s["macro_f1"], 26 / 45)


def test_absent_class_scores_zero_and_counts_in_the_macro_mean():
  s = metrics.precision_recall_f1(metrics.confusion_matrix(LABELS, PREDS, 4))
  assert s["precision"][3] == s["recall"][3] == s["f1"][3] == 0.0
  np.testing.assert_allclose(s["macro_f1"], (26 / 15) / 4)


def test_classification_report_matches_sklearn():
  sk = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  y, p = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
  rep = metrics.classification_report(y, p, 5)
  np.testing.assert_allclose(rep["accuracy"], sk.accuracy_score(y, p))
  for ours, avg in (("macro_precision", "precision_score"), ("macro_recall", "recall_score"),
                    ("macro_f1", "f1_score")):
    np.testing.assert_allclose(rep[ours], getattr(sk, avg)(y, p, average="macro",
                                                           zero_division=0))
  np.testing.assert_array_equal(rep["confusion"], sk.confusion_matrix(y, p, labels=range(5)))


def test_snr_bins_and_binned_rate_by_hand():
  np.testing.assert_array_equal(metrics.snr_bin_index([0, 4, 8, 8.1, -1, 3.9], [0, 4, 8]),
                                [0, 1, 1, -1, -1, 0])
  got = metrics.binned_rate([1, 2, 3, 4, 5], [10] * 5, [1, 3, 5, 7, 10], [0, 4, 8])
  assert got["snr_db"] == [2.0, 6.0] and got["count"] == [20, 20]
  np.testing.assert_allclose(got["rate"], [3 / 20, 7 / 20])
  empty = metrics.binned_rate([1], [1], [1.0], [0, 2, 4])
  assert empty["rate"] == [1.0, None] and empty["count"] == [1, 0]
  with pytest.raises(ValueError, match="edges"):
    metrics.snr_bin_index([1.0], [4, 0])


def test_error_counts_respect_the_mask():
  true = np.array([[0, 1, 2, 3], [3, 3, 3, 3]])
  pred = np.array([[1, 1, 2, 0], [3, 0, 0, 3]])
  mask = np.array([0, 1, 1, 1])  # position 0 is a pilot
  errors, counts = metrics.error_counts(true, pred, mask)
  np.testing.assert_array_equal(errors, [1, 2])
  np.testing.assert_array_equal(counts, [3, 3])


def test_nmse_by_hand():
  assert metrics.nmse(np.array([1 + 1j, 0]), np.array([1, 1])) == pytest.approx(1.0)
  assert metrics.nmse(np.array([1.5, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.25 / 5)
  assert metrics.to_db(0.01) == pytest.approx(-20.0)


def test_rate_interval_counts_frames_by_hand():
  # Two frames of 10 symbols: 0 and 4 errors. r = 4/20; residuals e - r c = (-2, 2);
  # se = sqrt(8 / (2 * 1)) / 10 = 0.2; the interval is 0.2 +- 1.96 * 0.2, clipped at 0.
  r, lo, hi = metrics.rate_interval([0, 4], [10, 10])
  np.testing.assert_allclose([r, lo, hi], [0.2, 0.0, 0.2 + 1.96 * 0.2])
  # Errors spread evenly over frames give a zero-width interval; none at all, the rule of 3.
  assert metrics.rate_interval([1, 1, 1], [10, 10, 10])[1:] == (0.1, 0.1)
  assert metrics.rate_interval([0, 0], [50, 50]) == (0.0, 0.0, 0.03)
  with pytest.raises(ValueError, match="counts"):
    metrics.rate_interval([1], [0])


def test_rate_interval_covers_the_truth_at_its_level():
  # Frames whose error probability varies (a fading channel): the frame-counting interval
  # covers the true rate in ~95% of 400 repetitions (binomial 99% band: [0.92, 0.975]).
  rng = np.random.default_rng(0)
  hits = 0
  for _ in range(400):
    p = rng.beta(0.5, 20, size=200)              # per-frame error probability, mean 1/41
    e = rng.binomial(50, p)
    _, lo, hi = metrics.rate_interval(e, np.full(200, 50))
    hits += lo <= 1 / 41 <= hi
  assert 0.92 <= hits / 400 <= 0.975, hits


def test_snr_at_interpolates_a_waterfall():
  # SER = 10^(-x / 10): log-linear in dB, so the interpolation is exact.
  x = np.arange(0.0, 31.0, 2.5)
  np.testing.assert_allclose(metrics.snr_at(x, 10.0 ** (-x / 10), 1e-1), 10.0)
  np.testing.assert_allclose(metrics.snr_at(x, 10.0 ** (-x / 10), 0.02), 10 * np.log10(50))
  # Missing points are skipped: from 0.5 at 0 dB to 0.05 at 10 dB (one decade in 10 dB),
  # 0.1 is log10(0.5 / 0.1) = 0.699 decades down, at 6.99 dB.
  rates = [0.5, None, 0.05]
  np.testing.assert_allclose(metrics.snr_at([0.0, 5.0, 10.0], rates, 0.1), 10 * np.log10(5))
  # A curve that never falls to the target, or starts below it, has no crossing.
  assert metrics.snr_at(x, np.full(x.size, 0.3), 0.1) is None
  assert metrics.snr_at(x, np.full(x.size, 0.01), 0.1) is None
  with pytest.raises(ValueError, match="target"):
    metrics.snr_at(x, x, 1.5)
