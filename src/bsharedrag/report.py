"""A Markdown report with PNG plots from the results of `bsharedrag compare` (RUN/compare.json).

`write_report(results, out_dir)` writes `out_dir/report.md` and its plots next to it, linked by
relative paths, so the folder can be committed under docs/ and read on GitHub. Every metric may be
missing for any system; a missing value is shown as "–" and left out of the plots.

Where the evaluation recorded them, each score shows its 95% bootstrap interval over the queries
(error bars in the plots), and a table gives each system's paired difference from `bsharedrag` on
the headline metrics: the mean per-query difference with its paired bootstrap interval, marked
with * where the interval excludes zero.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .config import portable_path
from .metrics import GENERATION_METRICS, RETRIEVAL_METRICS, paired_difference

__all__ = ["EFFICIENCY_METRICS", "load_results", "write_report"]

EFFICIENCY_METRICS = ("peak_rss_mib", "index_seconds", "query_ms_p50", "query_ms_p95", "tokens_per_second")
_HEADLINE = {"retrieval": ("hit@3", "ndcg@10"), "generation": ("bleu3", "rougeL")}  # plotted and swept
_MISSING = "–"
_DECIMALS = {"bleu3": 2, "rougeL": 2, "bertscore": 2, **dict.fromkeys(EFFICIENCY_METRICS, 1)}  # others: 3
_DPI = 110
_REFERENCE = "bsharedrag"  # the system every other one is compared with, query by query
_RESAMPLES = 1000


def load_results(path: Path) -> dict:
    """The results `bsharedrag compare` wrote; a ValueError naming the file if it is something else."""
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON ({error}); expected the compare.json of `bsharedrag compare`") from error
    missing = [key for key in ("datasets", "systems") if not isinstance(results, dict) or key not in results]
    if missing:
        raise ValueError(f"{path} is not a comparison results file: missing {', '.join(map(repr, missing))}; "
                         "expected the compare.json written by `bsharedrag compare`")
    return results


def write_report(results: Mapping, out_dir: Path) -> Path:
    """Write out_dir/report.md and its PNG plots; returns the path of report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    systems = results["systems"]
    sections = [_header(results)]
    sections += [_dataset_section(name, dataset, systems, out_dir) for name, dataset in results["datasets"].items()]
    sections += [_sweep_section(results, out_dir), _efficiency_section(systems, out_dir), _systems_section(systems)]
    path = out_dir / "report.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path


# --- sections ----------------------------------------------------------------------------------


def _header(results: Mapping) -> str:
    lines = ["# BSharedRAG comparison", "",
             f"- command: `{results.get('command', _MISSING)}`",
             f"- machine: {results.get('machine', _MISSING)}",
             f"- date: {results.get('date', _MISSING)}",
             f"- wall time of the latest invocation (systems kept from earlier ones excluded): {_duration(results.get('seconds'))}"]
    missing = [name for name in results.get("systems_listed", []) if name not in results.get("systems", {})]
    if missing:
        lines.append(f"- not built yet: {', '.join(missing)} (the same command builds them)")
    notes = results.get("notes") or []
    if notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


def _dataset_section(name: str, dataset: Mapping, systems: Mapping, out_dir: Path) -> str:
    parts = [f"## {name}", _dataset_summary(dataset)]
    plots = []
    for kind, metrics in (("retrieval", RETRIEVAL_METRICS), ("generation", GENERATION_METRICS)):
        scores = {system: values for system, entry in systems.items() if (values := _scores(entry, name, kind))}
        if not scores:
            parts.append(f"No system has {kind} metrics on {name}.")
            continue
        intervals = {system: _intervals(entry, name, kind) for system, entry in systems.items()}
        parts += [f"### {kind.capitalize()}", _system_table(systems, scores, metrics, intervals=intervals)]
        if paired := _paired_table(systems, name, kind):
            parts += [f"Paired differences from `{_REFERENCE}` on the same queries (95% paired bootstrap interval; "
                      "* where it excludes zero):", paired]
        file = f"{kind}-{_slug(name)}.png"
        _bar_chart(out_dir / file, scores, _HEADLINE[kind], f"{kind.capitalize()} on {name}", intervals)
        plots.append(f"![{kind} on {name}]({file})")
    return "\n\n".join(parts + plots)


def _paired_table(systems: Mapping, dataset: str, kind: str) -> str:
    reference = _per_query(systems.get(_REFERENCE, {}), dataset, kind)
    if not reference:
        return ""
    metrics, rows = _HEADLINE[kind], []
    for name, entry in systems.items():
        theirs = _per_query(entry, dataset, kind)
        if name == _REFERENCE or not theirs:
            continue
        cells = []
        for metric in metrics:
            ours = {q: scores[metric] for q, scores in theirs.items() if _is_number(scores.get(metric))}
            base = {q: scores[metric] for q, scores in reference.items() if _is_number(scores.get(metric))}
            if not set(ours) & set(base):
                cells.append(_MISSING)
                continue
            gap = paired_difference(ours, base, _RESAMPLES, seed=0)
            cells.append(f"{gap['difference']:+.{_DECIMALS.get(metric, 3)}f} "
                         f"[{_format(metric, gap['low'])}, {_format(metric, gap['high'])}]"
                         + (" *" if gap["excludes_zero"] else ""))
        rows.append([name, entry.get("group", _MISSING), *cells])
    return _table(["system", "group", *(f"{metric} − {_REFERENCE}" for metric in metrics)], rows, 2) if rows else ""


def _sweep_section(results: Mapping, out_dir: Path) -> str:
    title = "## λ sweep (fully shared)"
    sweep = sorted(((entry["lambda"], name, entry) for name, entry in results["systems"].items()
                    if entry.get("group") == "sweep" and _is_number(entry.get("lambda"))), key=lambda item: item[0])
    if not sweep or not results["datasets"]:
        return f"{title}\n\nNo fully shared systems with a λ were compared."
    first = next(iter(results["datasets"]))
    metrics = [metric for panel in _HEADLINE.values() for metric in panel]
    rows = []
    for weight, name, entry in sweep:
        values = {**_scores(entry, first, "retrieval"), **_scores(entry, first, "generation")}
        rows.append([f"{weight:g}", name, *(_format(metric, values.get(metric)) for metric in metrics)])
    table = _table(["λ", "system", *metrics], rows, text_columns=2)
    _sweep_plot(out_dir / "lambda-sweep.png", sweep, list(results["datasets"]))
    return "\n\n".join([title, f"Scores on {first}; the plot shows every dataset.", table,
                        "![λ sweep](lambda-sweep.png)"])


def _efficiency_section(systems: Mapping, out_dir: Path) -> str:
    title = "## Efficiency"
    measured = {name: entry["efficiency"] for name, entry in systems.items() if entry.get("efficiency")}
    if not measured:
        return f"{title}\n\nNo system was timed."
    days = {name: str(systems[name].get("date") or _MISSING)[:10] for name in measured}
    parts = [title, _system_table(systems, measured, EFFICIENCY_METRICS, {"timed on": days}),
             "![efficiency](efficiency.png)"]
    if (count := len(set(days.values()))) > 1:
        parts.insert(1, f"Timed on {count} different days. A shared host's speed varies from day to day, so "
                        "compare speeds only between systems timed on the same day; peak memory does not "
                        "depend on the day.")
    _efficiency_plot(out_dir / "efficiency.png", measured)
    return "\n\n".join(parts)


def _systems_section(systems: Mapping) -> str:
    lines = [f"- **{name}** ({entry.get('group', _MISSING)}): {entry.get('description') or _MISSING}"
             for name, entry in systems.items()]
    return "\n".join(["## Systems", "", *lines])


# --- tables and formatting -----------------------------------------------------------------------


def _scores(entry: Mapping, dataset: str, kind: str, key: str = "eval") -> dict:
    """One system's `kind` metrics on `dataset`, {} wherever any level is missing."""
    return dict(((entry.get(key) or {}).get(dataset) or {}).get(kind) or {})


def _intervals(entry: Mapping, dataset: str, kind: str) -> dict:
    """metric -> (low, high) of the 95% bootstrap interval, where recorded."""
    return _scores(entry, dataset, kind, "intervals")


def _per_query(entry: Mapping, dataset: str, kind: str) -> dict:
    """query id -> {metric: value}, where recorded."""
    return _scores(entry, dataset, kind, "per_query")


def _system_table(systems: Mapping, values: Mapping[str, Mapping], metrics: Sequence[str],
                  labels: Mapping[str, Mapping[str, str]] | None = None,
                  intervals: Mapping[str, Mapping] | None = None) -> str:
    """One row per system of `values`; `labels` adds text columns ({header: {system: text}}) before the metrics,
    `intervals` ({system: {metric: (low, high)}}) a bracketed interval after each score."""
    labels, intervals = labels or {}, intervals or {}

    def cell(name: str, metric: str, value) -> str:
        bounds = intervals.get(name, {}).get(metric)
        shown = _format(metric, value)
        return f"{shown} [{_format(metric, bounds[0])}, {_format(metric, bounds[1])}]" if bounds else shown

    rows = [[name, systems[name].get("group", _MISSING), *(column[name] for column in labels.values()),
             *(cell(name, metric, scores.get(metric)) for metric in metrics)] for name, scores in values.items()]
    return _table(["system", "group", *labels, *metrics], rows, text_columns=2 + len(labels))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int) -> str:
    """Text columns left-aligned, numbers right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


def _format(metric: str, value) -> str:
    return f"{value:.{_DECIMALS.get(metric, 3)}f}" if _is_number(value) else _MISSING


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _duration(seconds) -> str:
    if not _is_number(seconds):
        return _MISSING
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _dataset_summary(dataset: Mapping) -> str:
    data = portable_path(dataset["data"]) if dataset.get("data") else _MISSING
    summary = f"`{data}`, split {dataset.get('split', _MISSING)}: " \
              f"{dataset.get('queries', _MISSING)} queries"
    if dataset.get("generation_queries") is not None:
        summary += f", generation on {dataset['generation_queries']}"
    return summary + "."


def _slug(name: str) -> str:
    """A file name that works as a relative Markdown link (no spaces or slashes)."""
    return re.sub(r"[^\w.-]+", "_", name)


# --- plots ---------------------------------------------------------------------------------------


def _figure(width: float, height: float, panels: int = 1):
    # A bare Figure renders with Agg on savefig without touching pyplot's global backend or figure
    # list, so nothing needs closing and a caller's interactive session is left alone.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def _value(scores: Mapping, metric: str) -> float:
    value = scores.get(metric)
    return float(value) if _is_number(value) else math.nan  # NaN: no bar, no point


def _grouped_bars(axes, values: Mapping[str, Mapping], metrics: Sequence[str], ylabel: str,
                  intervals: Mapping[str, Mapping] | None = None) -> None:
    names, intervals = list(values), intervals or {}
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        offsets = [n + (i - (len(metrics) - 1) / 2) * width for n in range(len(names))]
        heights = [_value(values[name], metric) for name in names]
        bounds = [intervals.get(name, {}).get(metric) for name in names]
        errors = None
        if any(bounds):  # error bars from each bar's 95% interval (none where it was not recorded)
            errors = [[h - b[0] if b else 0.0 for h, b in zip(heights, bounds)],
                      [b[1] - h if b else 0.0 for h, b in zip(heights, bounds)]]
        axes.bar(offsets, heights, width, label=metric, yerr=errors, capsize=3 if errors else 0)
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_ylabel(ylabel)
    axes.grid(axis="y", alpha=0.3)
    if len(metrics) > 1:
        axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside, never over a bar


def _bar_chart(path: Path, scores: Mapping[str, Mapping], metrics: Sequence[str], title: str,
               intervals: Mapping[str, Mapping] | None = None) -> None:
    figure, (axes,) = _figure(max(6.0, 0.8 * len(scores) + 2), 4.5)
    _grouped_bars(axes, scores, metrics, "score", intervals)
    axes.set_title(title)
    figure.savefig(path)


def _sweep_plot(path: Path, sweep: Sequence[tuple], datasets: Sequence[str]) -> None:
    figure, panels = _figure(11, 4.5, panels=2)
    for axes, (kind, metrics) in zip(panels, _HEADLINE.items()):
        for n, dataset in enumerate(datasets):
            for metric, style in zip(metrics, ("-", "--")):
                points = [(weight, _value(_scores(entry, dataset, kind), metric)) for weight, _, entry in sweep]
                points = [(weight, value) for weight, value in points if not math.isnan(value)]
                if points:
                    axes.plot(*zip(*points), style, marker="o", color=f"C{n}", label=f"{dataset} {metric}")
        if all(weight > 0 for weight, _, _ in sweep):
            axes.set_xscale("log")
            axes.minorticks_off()
        weights = sorted({weight for weight, _, _ in sweep})
        axes.set_xticks(weights, [f"{weight:g}" for weight in weights])
        axes.set_xlabel("λ")
        axes.set_title(kind.capitalize())
        axes.grid(alpha=0.3)
        if axes.has_data():
            axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncols=2)
    figure.savefig(path)


def _efficiency_plot(path: Path, measured: Mapping[str, Mapping]) -> None:
    figure, (memory, latency) = _figure(max(10.0, 1.4 * len(measured) + 4), 4.5, panels=2)
    _grouped_bars(memory, measured, ["peak_rss_mib"], "MiB")
    memory.set_title("Peak RSS")
    _grouped_bars(latency, measured, ["query_ms_p50", "query_ms_p95"], "ms")
    latency.set_title("Query latency")
    figure.savefig(path)
