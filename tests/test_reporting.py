import json
import os

import numpy as np

from compressjax import reporting


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
  reporting.write_report(str(tmp_path), records, class_names=["a", "b"], title="t")
  assert json.loads((tmp_path / "metrics.json").read_text())[1]["name"] == "int8"
  assert "| int8 | 0.8900 |" in (tmp_path / "results.md").read_text()
  for png in ("ser_vs_snr.png", "pareto.png", "confusion.png"):
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
