"""Reports of a run: ``metrics.json``, a ``results.md`` table and PNG plots.

A run produces one record per stage: a flat dict of JSON-able values. The keys this
module reads are listed in `TABLE_COLUMNS`, plus ``ser`` (a dict with ``snr_db`` and
one curve per detector) and ``confusion`` (a list of rows) for the plots. Records
may carry more keys; they are kept in ``metrics.json``.
"""

import json
import math
import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # Files only: runs happen on headless machines.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

# (record key, column title, format). Missing values print as "-".
TABLE_COLUMNS = (
    ("name", "stage", "{}"),
    ("accuracy", "acc", "{:.4f}"),
    ("f1", "macro F1", "{:.4f}"),
    ("ser_mean", "SER", "{:.4f}"),
    ("nmse_db", "NMSE dB", "{:.2f}"),
    ("params_total", "params", "{:,.0f}"),
    ("params_nonzero", "non-zero", "{:,.0f}"),
    ("bytes", "bytes", "{:,.0f}"),
    ("compression", "x smaller", "{:.2f}"),
    ("flops", "FLOPs", "{:.3g}"),
    ("latency_ms", "latency ms", "{:.3f}"),
)


def _fmt(value: Any, fmt: str) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  try:
    return fmt.format(value)
  except (ValueError, TypeError):
    return str(value)


def markdown_table(records: Sequence[dict[str, Any]],
                   columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS) -> str:
  """Formats records as one Markdown table, a row per record."""
  head = "| " + " | ".join(title for _, title, _ in columns) + " |"
  rule = "|" + "|".join("---" for _ in columns) + "|"
  def cell(r, k, f):
    text = _fmt(r.get(k), f)
    if r.get(k + "_std") is not None:
      text += " ± " + _fmt(r[k + "_std"], f)
    return text
  rows = ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in records]
  return "\n".join([head, rule, *rows]) + "\n"


def aggregate(records: Sequence[dict[str, Any]],
              columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS) -> list[dict[str, Any]]:
  """Groups records by ``name`` (first-seen order): mean and ``<key>_std`` over seeds.

  Numeric table columns get their mean and (population) standard deviation (a column
  missing in any seed, e.g. an SNR the curve never reached, stays missing); SER and
  accuracy curves are averaged point by point; confusion matrices are summed.
  """
  groups: dict[str, list[dict[str, Any]]] = {}
  for r in records:
    groups.setdefault(r["name"], []).append(r)
  out = []
  for name, rs in groups.items():
    agg: dict[str, Any] = {"name": name, "seeds": len(rs)}
    for key, _, _ in columns[1:]:
      vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
      if len(vals) == len(rs):
        agg[key] = float(np.mean(vals))
        agg[key + "_std"] = float(np.std(vals))
    for curve in ("ser", "accuracy_curve"):
      if all(r.get(curve) for r in rs):
        agg[curve] = {k: (np.nanmean([_nan(r[curve][k]) for r in rs], axis=0).tolist()
                          if k != "snr_db" else rs[0][curve][k]) for k in rs[0][curve]}
    if all(r.get("confusion") is not None for r in rs):
      agg["confusion"] = np.sum([r["confusion"] for r in rs], axis=0).tolist()
    out.append(agg)
  return out


def paired_difference(records: Sequence[dict[str, Any]], first: str, second: str,
                      key: str, confidence: float = 0.95) -> dict[str, Any] | None:
  """The paired difference ``first - second`` of ``key`` over the seeds both ran.

  Pairs the two stage records of each seed (same teacher, same evaluation frames), and
  gives the mean difference with its Student-t interval over seeds (n - 1 degrees of
  freedom); with one seed there is no interval.

  Args:
    records: per-seed records with ``name``, ``seed`` and ``key``.
    first: the record name of the first arm (e.g. "P-Q-KD/3_distill").
    second: the second arm's name.
    key: the metric.
    confidence: the interval's level.

  Returns:
    ``{"mean", "lo", "hi", "n", "diffs"}`` (``lo``/``hi`` None for n < 2), or None when no
    seed has both values.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  by = {(r["name"], r["seed"]): r.get(key) for r in records}
  seeds = sorted({r["seed"] for r in records})
  diffs = [by[(first, s)] - by[(second, s)] for s in seeds
           if isinstance(by.get((first, s)), (int, float))
           and isinstance(by.get((second, s)), (int, float))]
  if not diffs:
    return None
  d = np.asarray(diffs, np.float64)
  out = {"mean": float(d.mean()), "lo": None, "hi": None, "n": int(d.size),
         "diffs": d.tolist()}
  if d.size >= 2:
    half = stats.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    out.update(lo=float(d.mean() - half), hi=float(d.mean() + half))
  return out


def verdict(diff: dict[str, Any] | None, first: str, second: str,
            lower_is_better: bool) -> str:
  """One sentence on a `paired_difference`: which arm wins, or that the data cannot tell."""
  if diff is None:
    return "not measured"
  if diff["lo"] is None:
    return f"one seed only ({diff['mean']:+.3g}): run 2 or more seeds to tell"
  if diff["lo"] <= 0 <= diff["hi"]:
    return "the data cannot tell (the interval holds 0)"
  first_lower = diff["hi"] < 0
  return f"{first if first_lower == lower_is_better else second} wins"


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON atomically (a reader never sees a half-written file)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=_to_jsonable)
  os.replace(tmp, path)


def _to_jsonable(x: Any) -> Any:
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def _nan(values: Sequence[Any]) -> np.ndarray:
  """A curve as floats, empty bins (None) as NaN."""
  return np.array([np.nan if v is None else v for v in values], float)


def _curve(values: Sequence[Any]) -> np.ndarray:
  """A curve for a log axis: empty bins as NaN, zeros floored at 1e-6."""
  return np.maximum(_nan(values), 1e-6)


def plot_ser(records: Sequence[dict[str, Any]], path: str, context: str = "") -> None:
  """SER against SNR: every stage's model (with its 95% interval when the record has one,
  ``ser_interval``), and the classical references once; ``context`` names the task,
  modulation and channel in the title."""
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  refs_drawn = False
  for r in records:
    ser = r.get("ser")
    if not ser:
      continue
    snr = ser["snr_db"]
    line, = ax.semilogy(snr, _curve(ser["model"]), marker="o", ms=3, label=r["name"])
    band = r.get("ser_interval")
    if band:
      ax.fill_between(snr, _curve(band["lo"]), _curve(band["hi"]), color=line.get_color(),
                      alpha=0.12, lw=0)
    if not refs_drawn:
      for ref, style in (("ls", ":"), ("lmmse", "-."), ("perfect_csi", "--")):
        if ref in ser:
          ax.semilogy(snr, _curve(ser[ref]), "k" + style, label=f"{ref} (reference)")
      refs_drawn = True
  ax.set_xlabel("SNR Es/N0 (dB)")
  ax.set_ylabel("symbol error rate (symbols task)")
  ax.set_title("SER against Es/N0" + (f": {context}" if context else ""), fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_accuracy(records: Sequence[dict[str, Any]], path: str, context: str = "") -> None:
  """Modulation accuracy against SNR: every stage, and the known-channel classifier once."""
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  ref_drawn = False
  for r in records:
    acc = r.get("accuracy_curve")
    if not acc:
      continue
    ax.plot(acc["snr_db"], _nan(acc["model"]), marker="o", ms=3, label=r["name"])
    if not ref_drawn and "known_channel" in acc:
      ax.plot(acc["snr_db"], _nan(acc["known_channel"]), "k--",
              label="classifier that knows the channel (reference)")
      ref_drawn = True
  ax.set_xlabel("SNR Es/N0 (dB)")
  ax.set_ylabel("modulation classification accuracy")
  ax.set_title("modulation task" + (f": {context}" if context else ""), fontsize=8)
  ax.set_ylim(0, 1.02)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
  """Indices of the (bytes, accuracy) points no other point beats on both axes."""
  front = []
  for i, (b, a) in enumerate(points):
    dominated = any((b2 <= b and a2 >= a) and (b2 < b or a2 > a)
                    for j, (b2, a2) in enumerate(points) if j != i)
    if not dominated:
      front.append(i)
  return sorted(front, key=lambda i: points[i][0])


def plot_pareto(records: Sequence[dict[str, Any]], path: str,
                metric: str = "accuracy", context: str = "",
                label: str | None = None, lower_is_better: bool = False) -> None:
  """``metric`` against real packed bytes, the Pareto front joined by a line.

  Rows aggregated over seeds (`aggregate`) are drawn with error bars of one standard
  deviation (``<metric>_std``, ``bytes_std``).

  Args:
    records: rows with ``bytes`` and ``metric``.
    path: the PNG written.
    metric: the record key on the y axis.
    context: the task and data, in the title.
    label: the y axis label (default: ``metric``).
    lower_is_better: the metric is a cost (a loss in dB), so the front takes its lowest.
  """
  recs = [r for r in records if r.get("bytes") and r.get(metric) is not None]
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  sign = -1.0 if lower_is_better else 1.0
  pts = [(float(r["bytes"]), float(r[metric])) for r in recs]
  for (b, a), r in zip(pts, recs):
    ax.errorbar(b, a, xerr=r.get("bytes_std") or None, yerr=r.get(f"{metric}_std") or None,
                fmt="o", ms=4, capsize=2)
    ax.annotate(r["name"], (b, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
  front = pareto_front([(b, sign * a) for b, a in pts])
  if front:
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=0.8,
            label="Pareto front")
    ax.legend(fontsize=7)
  ax.set_xscale("log")
  ax.set_xlabel("packed bytes (from the export)")
  ax.set_ylabel(label or metric)
  ax.set_title(f"{label or metric} against size" + (f": {context}" if context else ""),
               fontsize=8)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_confusion(confusion: Sequence[Sequence[int]], labels: Sequence[str],
                   path: str, title: str = "") -> None:
  """A row-normalised confusion matrix (rows: true class, columns: predicted)."""
  cm = np.asarray(confusion, dtype=np.float64)
  norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(4.8, 4.4))
  ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
  ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
  ax.set_yticks(range(len(labels)), labels, fontsize=7)
  for i in range(cm.shape[0]):
    for j in range(cm.shape[1]):
      ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
              color="white" if norm[i, j] > 0.5 else "black")
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def header_lines(fields: Sequence[tuple[str, Any]]) -> str:
  """The run's facts as a Markdown list (``- **study**: wireless``), for ``results.md``."""
  return "".join(f"- **{k}**: {v}\n" for k, v in fields) + "\n"


def legend_lines(columns: Sequence[tuple[str, str, str]], legend: dict[str, str]) -> str:
  """``## Columns``: what every column of the table measures (its key in ``legend``).

  Raises:
    ValueError: if a column has no entry in ``legend`` (a report explains all of them).
  """
  missing = [key for key, _, _ in columns if key not in legend]
  if missing:
    raise ValueError(f"legend must describe every column, missing {missing}")
  return "\n## Columns\n\n" + "".join(
      f"- **{title}**: {legend[key]}\n" for key, title, _ in columns)


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def write_report(workdir: str, records: Sequence[dict[str, Any]],
                 table: Sequence[dict[str, Any]] | None = None,
                 class_names: Sequence[str] | None = None, title: str = "",
                 columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS,
                 footer: str = "", header: Sequence[tuple[str, Any]] = (),
                 legend: dict[str, str] | None = None, context: str = "",
                 finals: Sequence[str] | None = None, pareto_label: str | None = None,
                 paretos: Sequence[tuple[str, str, bool]] = ()) -> None:
  """Writes ``metrics.json`` (all ``records``), ``results.md`` and plots to ``workdir``.

  Args:
    workdir: an existing directory.
    records: one dict per stage (and seed).
    table: the rows of ``results.md`` and the plots; default ``records`` (pass
      ``aggregate(records)`` for mean and standard deviation over seeds).
    class_names: labels of the confusion matrices.
    title: heading of ``results.md``.
    columns: the table's columns, as in `TABLE_COLUMNS`.
    footer: Markdown appended after the table.
    header: ``(name, value)`` facts of the run listed under the title (study, size,
      steps per stage, seeds, device, the SNR range, ...).
    legend: what each column measures (task, unit, the frames or images it averages
      over), by record key; every column needs one. None: no legend.
    context: what the plots show (task, modulation, channel, data set), in their titles.
    finals: the stages whose confusion matrices are drawn (``confusion_<name>.png``);
      default the last row. ``confusion.png`` is the last of them.
    pareto_label: the y axis of ``pareto.png`` (its metric is ``accuracy``).
    paretos: more Pareto plots, ``(metric, label, lower_is_better)`` each, written as
      ``pareto_<metric>.png``.
  """
  write_json(os.path.join(workdir, "metrics.json"), list(records))
  records = list(records if table is None else table)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    if title:
      f.write(f"# {title}\n\n")
    if header:
      f.write(header_lines(header))
    f.write(markdown_table(records, columns) + footer)
    if legend is not None:
      f.write(legend_lines(columns, legend))
  if any(r.get("ser") for r in records):
    plot_ser(records, os.path.join(workdir, "ser_vs_snr.png"), context)
  if any(r.get("accuracy_curve") for r in records):
    plot_accuracy(records, os.path.join(workdir, "accuracy_vs_snr.png"), context)
  plot_pareto(records, os.path.join(workdir, "pareto.png"), context=context,
              label=pareto_label)
  for metric, label, lower in paretos:
    if any(r.get(metric) is not None for r in records):
      plot_pareto(records, os.path.join(workdir, f"pareto_{_slug(metric)}.png"), metric,
                  context, label, lower)
  by_name = {r["name"]: r for r in records}
  names = list(finals) if finals else [records[-1]["name"]] if records else []
  drawn = [by_name[n] for n in names if by_name.get(n, {}).get("confusion") is not None]
  for i, r in enumerate(drawn):
    labels = class_names or [str(k) for k in range(len(r["confusion"]))]
    title = f"confusion: {r['name']}" + (f"\n{context}" if context else "")
    plot_confusion(r["confusion"], labels,
                   os.path.join(workdir, f"confusion_{_slug(r['name'])}.png"), title=title)
    if i == len(drawn) - 1:
      plot_confusion(r["confusion"], labels, os.path.join(workdir, "confusion.png"),
                     title=title)
