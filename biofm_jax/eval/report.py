"""Validation report of a downstream task: report.json, report.md, report.html and PNG plots.

This module owns how a finished evaluation is written down; it computes no metric itself
(see biofm_jax.eval.metrics). The report dict it takes:

  {"task": {"name": str, "type": one of data/batch.TASK_TYPES, ...},
   "model": {"name": str (optional, default "model"), ...free-form description...},
   "splits": {"held_out": {"n": int, "metrics": {metric: value},
                           "intervals": {metric: [lo, hi]},           # optional
                           "subgroups": {column: {value: {"n": ..., metric: ...}}},  # optional
                           "subgroups_not_formed": {column: why},  # optional
                           "undefined": {metric: why}},  # optional: why a metric is absent (one class)
              "tuning": {...same shape...}, ...},
   "baselines": {method_name: {"held_out": {"metrics": {...}, "intervals": {...}}, ...}},  # optional
   "few_shot": {"metric": "auroc", "k": [1, 2, 4, ...],                   # optional
                "methods": {method_name: {"mean": [...], "std": [...]}}},
   "summary": [str, ...],                                                 # optional
   "interval_level": 0.95}                                                # optional, for headings

report.json holds this structure made JSON-safe (numpy scalars and arrays become numbers
and lists, NaN and infinities become null), with the summary filled in when absent, and
ALSO, for each split, a top-level key holding that split's metric values, so that
json["held_out"]["auroc"] reads the model's held-out AUROC without knowing the nesting.
Plot data (curves_by_method) goes into the PNGs only, not into report.json.

Every file is written to a temporary name in the output directory and moved into place
with os.replace, report.json last, so a crash never leaves a half-written file and a
present report.json means the rest of the report was written with it.
"""
from __future__ import annotations

import html
import io
import json
import math
import os
import pathlib
import tempfile
from typing import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # a bare Figure renders with Agg; no global backend is touched

from biofm_jax.eval.metrics import primary_metric

PNG_ROC, PNG_CALIBRATION, PNG_KM, PNG_FEW_SHOT = "roc.png", "calibration.png", "km_by_risk.png", "few_shot.png"
_PLOT_TITLES = {PNG_ROC: "ROC curves", PNG_CALIBRATION: "Calibration", PNG_KM: "Kaplan-Meier by predicted risk",
                PNG_FEW_SHOT: "Few-shot learning curve"}
_NO_INTERVAL = ("n", "events", "prevalence")


def write_report(out_dir, report: Mapping, *, curves_by_method: Mapping[str, dict] | None = None) -> pathlib.Path:
  """Write report.json, report.md, report.html and plots into out_dir; return out_dir.

  curves_by_method maps a method name (the model's or a baseline's) to metrics.curves(...)
  of its held-out predictions; it drives roc.png, calibration.png and km_by_risk.png.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  report = to_json_safe(report)
  if not report.get("summary"):
    report["summary"] = summary_lines(report)
  plots = _write_plots(out_dir, report, curves_by_method or {})
  blocks = _report_blocks(report, plots)
  write_atomic(out_dir / "report.md", _render_markdown(blocks).encode())
  write_atomic(out_dir / "report.html", _render_html(_title(report), blocks).encode())
  text = json.dumps(_with_flat_splits(report), indent=2, allow_nan=False)
  write_atomic(out_dir / "report.json", text.encode())
  return out_dir


def summary_lines(report: Mapping) -> list[str]:
  """One plain comparison per split of the model's primary metric against the best baseline.

  Interval overlap is stated as such; it is a rough guide, not a significance test. A split
  whose metric is absent gets a line saying so and why, so that a reader never takes another
  split's comparison for it.
  """
  report = to_json_safe(report)
  metric = primary_metric(report["task"]["type"])
  lines = []
  for split, body in report.get("splits", {}).items():
    value = body.get("metrics", {}).get(metric)
    if value is None:
      why = (body.get("undefined") or {}).get(metric) or "not defined on this split's labels"
      lines.append(f"{split} {metric} n/a ({why}): the models are not compared on {split}")
      continue
    interval = body.get("intervals", {}).get(metric)
    line = f"{split} {metric} {_fmt_with_interval(value, interval)}"
    best = _best_baseline(report, split, metric)
    if best is None:
      lines.append(line + " (no baseline scored on this split)")
      continue
    name, base_value, base_interval = best
    lines.append(f"{line} vs best baseline {name} {_fmt_with_interval(base_value, base_interval)}: "
                 f"{value - base_value:+.3f} ({_overlap_phrase(interval, base_interval)})")
  lines.extend(_few_shot_lines(report.get("few_shot")))
  return lines


def to_json_safe(value):
  """A copy of value that json.dumps(allow_nan=False) accepts: numpy -> python, NaN/inf -> None."""
  if isinstance(value, Mapping):
    return {str(k): to_json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [to_json_safe(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if value is None or isinstance(value, str):
    return value
  if value is getattr(pd, "NA", None) or value is getattr(pd, "NaT", None):
    return None
  return str(value)  # free-form descriptions may hold paths and the like


# --- summary helpers --------------------------------------------------------------------------------


def _best_baseline(report, split, metric):
  scored = []
  for name, body in report.get("baselines", {}).items():
    value = body.get(split, {}).get("metrics", {}).get(metric)
    if value is not None:
      scored.append((value, name, body[split].get("intervals", {}).get(metric)))
  if not scored:
    return None
  value, name, interval = max(scored, key=lambda s: s[0])  # every primary metric is higher-is-better
  return name, value, interval


def _overlap_phrase(a, b) -> str:
  if not a or not b or None in (*a, *b):
    return "no intervals to compare"
  return "intervals overlap" if a[0] <= b[1] and b[0] <= a[1] else "intervals do not overlap"


def _few_shot_lines(few_shot):
  if not few_shot or not few_shot.get("methods") or not few_shot.get("k"):
    return []
  lines = []
  for position in sorted({0, len(few_shot["k"]) - 1}):
    scored = [(m["mean"][position], name, (m.get("std") or [None] * len(few_shot["k"]))[position])
              for name, m in few_shot["methods"].items() if m["mean"][position] is not None]
    if scored:
      mean, name, std = max(scored, key=lambda s: s[0])
      lines.append(f"few-shot {few_shot.get('metric', 'metric')} at k={few_shot['k'][position]}: "
                   f"best {name} {_fmt(mean)}" + (f" ± {_fmt(std)}" if std is not None else ""))
  return lines


# --- document blocks, rendered to Markdown and HTML -------------------------------------------------
# A block is ("heading", level, text), ("bullets", [str]), ("table", header, rows) or ("image", alt, file).


def _title(report) -> str:
  return f"Validation report: {report['task'].get('name', 'task')}"


def _report_blocks(report, plots):
  level = report.get("interval_level", 0.95)
  blocks = [("heading", 1, _title(report)),
            ("heading", 2, "Task"), ("bullets", _describe(report["task"])),
            ("heading", 2, "Model"), ("bullets", _describe(report.get("model", {})))]
  for split, body in report.get("splits", {}).items():
    blocks.append(("heading", 2, f"Metrics: {split} (value [{level:.0%} interval])"))
    blocks.append(_metrics_table(report, split))
    if body.get("undefined"):
      blocks.append(("bullets", [f"{metric} is n/a on {split}: {why}" for metric, why in body["undefined"].items()]))
  for split, body in report.get("splits", {}).items():
    for column, by_value in (body.get("subgroups") or {}).items():
      blocks.append(("heading", 3, f"Subgroups of {split} by {column}"))
      blocks.append(_subgroup_table(column, by_value))
    if body.get("subgroups_not_formed"):
      blocks.append(("heading", 3, f"Subgroups of {split} not formed"))
      blocks.append(("bullets", [f"{column}: {why}" for column, why in body["subgroups_not_formed"].items()]))
  if report.get("few_shot"):
    blocks.append(("heading", 2, f"Few-shot ({report['few_shot'].get('metric', 'metric')}, mean ± std)"))
    blocks.append(_few_shot_table(report["few_shot"]))
  blocks += [("heading", 2, "Summary"), ("bullets", list(report.get("summary", [])))]
  if plots:
    blocks.append(("heading", 2, "Plots"))
    blocks += [("image", _PLOT_TITLES[name], name) for name in plots]
  return blocks


def _describe(mapping):
  return [f"{key}: {value if isinstance(value, str) else json.dumps(value)}" for key, value in mapping.items()]


def _metrics_table(report, split):
  """Metrics as rows, the model and each baseline scored on `split` as columns."""
  columns = {report.get("model", {}).get("name", "model"): report["splits"][split]}
  for name, body in report.get("baselines", {}).items():
    if split in body:
      columns[name] = body[split]
  names = list(dict.fromkeys(m for body in columns.values() for m in body.get("metrics", {})))
  rows = [[metric] + [_fmt_with_interval(body.get("metrics", {}).get(metric),
                                         None if metric in _NO_INTERVAL else body.get("intervals", {}).get(metric))
                      for body in columns.values()] for metric in names]
  return ("table", ["metric", *columns], rows)


def _subgroup_table(column, by_value):
  names = list(dict.fromkeys(m for g in by_value.values() if not g.get("too_small") for m in g if m != "n"))
  rows = []
  for value, group in by_value.items():
    if group.get("too_small"):
      rows.append([value, _fmt(group["n"]), *(["too small"] + [""] * (len(names) - 1) if names else [])])
    else:
      rows.append([value, _fmt(group["n"]), *(_fmt(group.get(m)) for m in names)])
  return ("table", [column, "n", *names], rows)


def _few_shot_table(few_shot):
  rows = []
  for name, m in few_shot.get("methods", {}).items():
    stds = m.get("std") or [None] * len(m["mean"])
    cells = (_fmt(mean) + ("" if std is None else f" ± {_fmt(std)}") for mean, std in zip(m["mean"], stds))
    rows.append([name, *cells])
  return ("table", ["method", *(f"k={k}" for k in few_shot["k"])], rows)


def _fmt(value) -> str:
  if value is None:
    return "n/a"
  return f"{value:.3f}" if isinstance(value, float) else str(value)


def _fmt_with_interval(value, interval) -> str:
  if not interval or None in interval:
    return _fmt(value)
  return f"{_fmt(value)} [{_fmt(interval[0])}, {_fmt(interval[1])}]"


def _render_markdown(blocks) -> str:
  out = []
  for block in blocks:
    kind = block[0]
    if kind == "heading":
      out.append(f"{'#' * block[1]} {block[2]}\n")
    elif kind == "bullets":
      out.append("\n".join(f"- {item}" for item in block[1]) + "\n" if block[1] else "(none)\n")
    elif kind == "table":
      header, rows = block[1], block[2]
      lines = [_md_row(header), _md_row(["---"] * len(header))] + [_md_row(r) for r in rows]
      out.append("\n".join(lines) + "\n")
    elif kind == "image":
      out.append(f"![{block[1]}]({block[2]})\n")
  return "\n".join(out)


def _md_row(cells) -> str:
  return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _render_html(title, blocks) -> str:
  esc = html.escape
  body = []
  for block in blocks:
    kind = block[0]
    if kind == "heading":
      body.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
    elif kind == "bullets":
      body.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block[1]) + "</ul>")
    elif kind == "table":
      head = "".join(f"<th>{esc(str(c))}</th>" for c in block[1])
      rows = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
      body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    elif kind == "image":
      body.append(f'<figure><img src="{esc(block[2])}" alt="{esc(block[1])}"><figcaption>{esc(block[1])}'
                  "</figcaption></figure>")
  style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #999;padding:.2em .6em;text-align:left}img{max-width:100%}")
  return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
          f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


# --- plots ------------------------------------------------------------------------------------------


def _write_plots(out_dir, report, curves_by_method) -> list[str]:
  """Draw whichever plots the data supports; return the file names written."""
  figures = {}
  roc = {name: c["roc"] for name, c in curves_by_method.items() if "roc" in c}
  if roc:
    figures[PNG_ROC] = _line_plot(roc, "false positive rate", "true positive rate", diagonal=True)
  calibration = {name: c["calibration"] for name, c in curves_by_method.items() if "calibration" in c}
  if calibration:
    figures[PNG_CALIBRATION] = _line_plot(calibration, "mean predicted probability", "fraction positive",
                                          diagonal=True, marker="o")
  km = {name: c["km"] for name, c in curves_by_method.items() if c.get("km")}
  if km:
    figures[PNG_KM] = _km_plot(km)
  if report.get("few_shot") and report["few_shot"].get("methods"):
    figures[PNG_FEW_SHOT] = _few_shot_plot(report["few_shot"])
  for name, figure in figures.items():
    write_atomic(out_dir / name, png_bytes(figure))
  return list(figures)


def png_bytes(figure) -> bytes:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100)
  return buffer.getvalue()


def _line_plot(xy_by_method, xlabel, ylabel, *, diagonal=False, marker=None):
  figure = Figure(figsize=(5, 5), layout="constrained")
  ax = figure.subplots()
  if diagonal:
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
  for name, (x, y) in xy_by_method.items():
    ax.plot(x, y, label=name, marker=marker)
  ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
  ax.legend(loc="best")
  return figure


def _km_plot(km_by_method):
  figure = Figure(figsize=(4.5 * len(km_by_method), 4), layout="constrained")
  axes = np.atleast_1d(figure.subplots(1, len(km_by_method), sharey=True))
  for ax, (name, by_group) in zip(axes, km_by_method.items()):
    for group, (timeline, survival) in by_group.items():
      ax.step(timeline, survival, where="post", label=f"{group} risk")
    ax.set(title=name, xlabel="days", ylim=(0, 1.02))
    ax.legend(loc="best")
  axes[0].set_ylabel("survival probability")
  return figure


def _few_shot_plot(few_shot):
  figure = Figure(figsize=(6, 4), layout="constrained")
  ax = figure.subplots()
  k = np.asarray(few_shot["k"], np.float64)
  for name, m in few_shot["methods"].items():
    mean = np.array([np.nan if v is None else v for v in m["mean"]], np.float64)
    std = None if not m.get("std") else np.array([0.0 if v is None else v for v in m["std"]], np.float64)
    ax.errorbar(k, mean, yerr=std, label=name, marker="o", capsize=3)
  ax.set_xscale("log", base=2)
  ax.set(xlabel="k (labelled examples)", ylabel=few_shot.get("metric", "metric"))
  ax.legend(loc="best")
  return figure


# --- files ------------------------------------------------------------------------------------------


def _with_flat_splits(report):
  flat = dict(report)
  for split, body in report.get("splits", {}).items():
    if split in flat:
      raise ValueError(f"split name {split!r} collides with a top-level report key")
    flat[split] = dict(body.get("metrics", {}))
  return flat


def write_atomic(path: pathlib.Path, data: bytes) -> None:
  """Write to a temporary file beside path, then rename over it: readers see old or new, never half."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
