import json
import os

import numpy as np
import pytest

from compressjax import reporting


def test_pareto_front_of_a_cost_is_the_front_of_its_negation():
  # (bytes, dB loss): lower loss is better; (50, 0.9) is beaten by (40, 0.5).
  pts = [(100.0, 0.1), (50.0, 0.9), (40.0, 0.5), (10.0, 2.0)]
  assert reporting.pareto_front([(b, -l) for b, l in pts]) == [3, 2, 0]


def test_pareto_front_hand_computed():
  # (bytes, accuracy): point 2 is dominated by point 1 (smaller and more accurate).
  pts = [(100.0, 0.9), (50.0, 0.8), (60.0, 0.7), (10.0, 0.5), (10.0, 0.4)]
  assert reporting.pareto_front(pts) == [3, 1, 0]


def test_markdown_table_formats_and_marks_missing():
  table = reporting.markdown_table(
      [{"name": "teacher", "accuracy": 0.91234, "bytes": 123456}],
      columns=(("name", "stage", "{}"), ("accuracy", "acc", "{:.3f}"),
               ("bytes", "bytes", "{:,}"), ("f1", "F1", "{:.2f}")))
  lines = table.splitlines()
  assert lines[0] == "| stage | acc | bytes | F1 |"
  assert lines[2] == "| teacher | 0.912 | 123,456 | - |"


def test_write_report_writes_json_table_and_plots(tmp_path):
  records = [
      {"name": "teacher", "accuracy": 0.9, "bytes": 4000, "confusion": [[5, 1], [0, 4]],
       "ser": {"snr_db": [0, 10], "model": [0.3, 0.01], "perfect_csi": [0.2, 0.001]}},
      {"name": "int8", "accuracy": 0.89, "bytes": 1000, "confusion": [[4, 2], [1, 3]],
       "ser": {"snr_db": [0, 10], "model": [0.31, 0.02]}},
  ]
  records[1].update(loss_db=0.4, loss_db_std=0.1, bytes_std=20.0)
  reporting.write_report(str(tmp_path), records, class_names=["a", "b"], title="t",
                         paretos=[("loss_db", "loss dB", True), ("absent", "none", False)])
  assert json.loads((tmp_path / "metrics.json").read_text())[1]["name"] == "int8"
  assert "| int8 | 0.8900 |" in (tmp_path / "results.md").read_text()
  assert not (tmp_path / "pareto_absent.png").exists()
  for png in ("ser_vs_snr.png", "pareto.png", "confusion.png", "pareto_loss_db.png"):
    assert os.path.getsize(tmp_path / png) > 1000


def test_aggregate_gives_mean_and_std_per_stage_over_seeds():
  records = [
      {"name": "teacher", "accuracy": 0.8, "bytes": 100, "confusion": [[1, 0], [0, 1]],
       "ser": {"snr_db": [0, 10], "model": [0.4, None]}},
      {"name": "P-Q-KD", "accuracy": 0.5, "bytes": 10},
      {"name": "teacher", "accuracy": 0.6, "bytes": 100, "confusion": [[2, 1], [0, 1]],
       "ser": {"snr_db": [0, 10], "model": [0.2, 0.1]}},
  ]
  agg = reporting.aggregate(records)
  assert [a["name"] for a in agg] == ["teacher", "P-Q-KD"]
  assert agg[0]["seeds"] == 2
  np.testing.assert_allclose([agg[0]["accuracy"], agg[0]["accuracy_std"]], [0.7, 0.1])
  assert agg[0]["confusion"] == [[3, 1], [0, 2]]
  np.testing.assert_allclose(agg[0]["ser"]["model"], [0.3, 0.1])  # an empty bin is skipped
  assert "| teacher | 0.7000 ± 0.1000 |" in reporting.markdown_table(agg)


def _seeded(values_a, values_b, key="loss"):
  recs = []
  for s, (a, b) in enumerate(zip(values_a, values_b)):
    recs += [{"name": "A/3", "seed": s, key: a}, {"name": "B/3", "seed": s, key: b}]
  return recs


def test_paired_difference_is_a_t_interval_over_seeds_by_hand():
  # Differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.3027 -> 2 +- 4.3027 / sqrt(3).
  d = reporting.paired_difference(_seeded([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]), "A/3", "B/3",
                                  "loss")
  half = 4.302652729911275 / np.sqrt(3)
  np.testing.assert_allclose([d["mean"], d["lo"], d["hi"]], [2.0, 2.0 - half, 2.0 + half])
  assert d["n"] == 3 and d["diffs"] == [1.0, 2.0, 3.0]
  # A seed missing a value (None: e.g. a curve that never reached its target) is left out.
  recs = _seeded([2.0, None, 6.0], [1.0, 2.0, 3.0])
  assert reporting.paired_difference(recs, "A/3", "B/3", "loss")["n"] == 2
  assert reporting.paired_difference(recs, "A/3", "B/3", "other") is None


def test_verdict_follows_the_interval():
  tight = reporting.paired_difference(_seeded([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]), "A/3", "B/3",
                                      "loss")
  assert reporting.verdict(tight, "A", "B", lower_is_better=True) == "A wins"
  assert reporting.verdict(tight, "A", "B", lower_is_better=False) == "B wins"
  wide = reporting.paired_difference(_seeded([1.0, 3.0, 0.0], [2.0, 1.0, 1.5]), "A/3", "B/3",
                                     "loss")
  assert "cannot tell" in reporting.verdict(wide, "A", "B", lower_is_better=True)
  one = reporting.paired_difference(_seeded([1.0], [2.0]), "A/3", "B/3", "loss")
  assert one["lo"] is None and "one seed only" in reporting.verdict(one, "A", "B", True)
  assert reporting.verdict(None, "A", "B", True) == "not measured"


def test_report_opens_with_the_run_and_ends_with_a_legend_of_every_column(tmp_path):
  records = [{"name": "teacher", "accuracy": 0.9, "bytes": 100,
              "confusion": [[3, 1], [0, 4]]},
             {"name": "P/2_q", "accuracy": 0.8, "bytes": 20, "confusion": [[2, 2], [1, 3]]},
             {"name": "Q/2_p", "accuracy": 0.7, "bytes": 25, "confusion": [[4, 0], [2, 2]]}]
  columns = (("name", "stage", "{}"), ("accuracy", "acc", "{:.2f}"))
  legend = {"name": "the stage", "accuracy": "top-1 accuracy on 8 images"}
  reporting.write_report(str(tmp_path), records, columns=columns, title="t",
                         header=[("study", "vision"), ("seeds", "0")], legend=legend,
                         context="digits 8x8", finals=["P/2_q", "Q/2_p"])
  text = (tmp_path / "results.md").read_text()
  assert text.index("- **study**: vision") < text.index("| stage |")
  assert text.index("| stage |") < text.index("## Columns")
  assert "- **acc**: top-1 accuracy on 8 images" in text
  # One confusion matrix per final stage; confusion.png is the last of them.
  for name in ("P_2_q", "Q_2_p"):
    assert (tmp_path / f"confusion_{name}.png").stat().st_size > 0
  assert not (tmp_path / "confusion_teacher.png").exists()
  last = (tmp_path / "confusion_Q_2_p.png").read_bytes()
  assert (tmp_path / "confusion.png").read_bytes() == last


def test_a_legend_must_explain_every_column():
  with pytest.raises(ValueError, match=r"missing \['bytes'\]"):
    reporting.legend_lines((("name", "stage", "{}"), ("bytes", "bytes", "{}")),
                           {"name": "the stage"})
