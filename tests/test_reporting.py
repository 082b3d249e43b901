import json
import os

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
