"""The comparison report: tables with the right cells, "–" for gaps, and plots behind every link."""

import json
import re

import pytest

from bsharedrag.report import load_results, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATASETS = ("epqa-dev", "hetpqa-test")


def _retrieval(hit3: float) -> dict:
    return {"hit@1": 0.6, "hit@3": hit3, "hit@5": 0.94, "ndcg@3": 0.58, "ndcg@5": 0.61, "ndcg@10": 0.74,
            "mrr@10": 0.75, "recall@10": 0.93}


def _generation(bleu3: float) -> dict:
    return {"bleu3": bleu3, "rougeL": 44.1, "bertscore": 56.2, "citation_precision": 0.597}


def _efficiency(rss: float) -> dict:
    return {"peak_rss_mib": rss, "index_seconds": 643.0, "query_ms_p50": 45.0, "query_ms_p95": 80.0,
            "tokens_per_second": 27.0}


def _sweep(weight: float, hit3: float) -> dict:
    generation = _generation(20.0 + weight)
    del generation["bertscore"]  # a metric this system lacks
    return {"group": "sweep", "lambda": weight, "description": f"one adapter, λ = {weight:g}", "date": "2026-11-29T10:00:00",
            "eval": {name: {"retrieval": _retrieval(hit3), "generation": generation} for name in DATASETS},
            "efficiency": {"peak_rss_mib": 1100.0, "query_ms_p50": 40.0}}


def _results(lambdas=(1.0, 0.1)) -> dict:
    """Sweep systems listed out of λ order; bm25 has retrieval only, zero_shot generation only."""
    systems = {
        "bsharedrag": {"group": "system", "lambda": None, "description": "two adapters on the shared backbone",
                       "date": "2026-11-28T04:30:00",
                       "eval": {name: {"retrieval": _retrieval(0.81), "generation": _generation(25.3)}
                                for name in DATASETS},
                       "efficiency": _efficiency(1237.0)},
        "bm25": {"group": "baseline", "description": "bm25s with jieba",
                 "eval": {name: {"retrieval": _retrieval(0.83)} for name in DATASETS}},
        "zero_shot": {"group": "baseline", "description": "backbone without adapters",
                      "eval": {"epqa-dev": {"generation": _generation(12.5)}}},
    }
    systems |= {f"fully_shared-l{weight:g}": _sweep(weight, 0.7 + weight / 10) for weight in lambdas}
    return {
        "command": "bsharedrag compare --config configs/compare-quick.yaml",
        "machine": "2-core Intel Xeon, 24 GiB, no GPU",
        "date": "2026-11-28T04:00:00",
        "seconds": 5400.0,
        "notes": ["generation metrics on the first 40 queries with answers"],
        "systems_listed": ["bsharedrag", "fully_shared-l1", "fully_shared-l0.1", "no_cpt"],
        "datasets": {name: {"data": f"/data/{name}", "split": name.split("-")[1], "queries": 160,
                            "generation_queries": 40} for name in DATASETS},
        "systems": systems,
    }


def _table(markdown: str, *headings: str) -> list[dict]:
    """The rows (header -> cell) of the first table after the given headings, found in order."""
    lines = markdown.splitlines()
    start = 0
    for heading in headings:
        start = lines.index(heading, start)
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip("|").split("|")])
        elif table:
            break
    header, _, *rows = table
    return [dict(zip(header, row)) for row in rows]


def _by_system(rows: list[dict]) -> dict:
    return {row["system"]: row for row in rows}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("report")
    path = write_report(_results(), out_dir)
    return path, path.read_text(encoding="utf-8")


def test_report_starts_with_the_header_and_keeps_the_section_order(report):
    path, markdown = report
    assert path.name == "report.md"
    assert markdown.startswith("# BSharedRAG comparison\n")
    for text in ("`bsharedrag compare --config configs/compare-quick.yaml`", "2-core Intel Xeon, 24 GiB, no GPU",
                 "2026-11-28T04:00:00", "1 h 30 min", "- generation metrics on the first 40 queries with answers",
                 "- not built yet: no_cpt (the same command builds them)"):
        assert text in markdown
    order = ["## epqa-dev", "## hetpqa-test", "## λ sweep (fully shared)", "## Efficiency", "## Systems"]
    positions = [markdown.index(f"\n{heading}\n") for heading in order]
    assert positions == sorted(positions)
    assert "- **bm25** (baseline): bm25s with jieba" in markdown


def test_dataset_tables_show_formatted_values_in_the_right_rows(report):
    _, markdown = report
    retrieval = _table(markdown, "## epqa-dev", "### Retrieval")
    assert [row["system"] for row in retrieval] == ["bsharedrag", "bm25", "fully_shared-l1", "fully_shared-l0.1"]
    rows = _by_system(retrieval)
    assert rows["bm25"]["group"] == "baseline"
    assert rows["bm25"]["hit@3"] == "0.830" and rows["bsharedrag"]["hit@3"] == "0.810"
    assert rows["bsharedrag"]["ndcg@10"] == "0.740"

    generation = _by_system(_table(markdown, "## epqa-dev", "### Generation"))
    assert "bm25" not in generation  # retrieval only
    assert generation["zero_shot"]["bleu3"] == "12.50" and generation["zero_shot"]["citation_precision"] == "0.597"
    assert generation["fully_shared-l0.1"]["bertscore"] == "–"

    other = _by_system(_table(markdown, "## hetpqa-test", "### Generation"))
    assert "zero_shot" not in other and other["bsharedrag"]["rougeL"] == "44.10"


def test_efficiency_table_skips_untimed_systems_and_marks_gaps(report):
    _, markdown = report
    rows = _by_system(_table(markdown, "## Efficiency"))
    assert list(rows) == ["bsharedrag", "fully_shared-l1", "fully_shared-l0.1"]
    assert rows["bsharedrag"]["peak_rss_mib"] == "1237.0" and rows["bsharedrag"]["query_ms_p95"] == "80.0"
    assert rows["fully_shared-l1"]["tokens_per_second"] == "–"
    assert rows["bsharedrag"]["timed on"] == "2026-11-28" and rows["fully_shared-l1"]["timed on"] == "2026-11-29"


def test_efficiency_timed_on_several_days_says_so(report, tmp_path):
    _, markdown = report
    assert "Timed on 2 different days" in markdown
    results = _results()
    for entry in results["systems"].values():
        entry["date"] = "2026-11-29T10:00:00"
    same_day = write_report(results, tmp_path / "same-day").read_text()
    assert "different days" not in same_day


def test_sweep_table_is_sorted_by_lambda(report):
    _, markdown = report
    rows = _table(markdown, "## λ sweep (fully shared)")
    assert [(row["λ"], row["system"]) for row in rows] == [("0.1", "fully_shared-l0.1"), ("1", "fully_shared-l1")]
    assert rows[0]["hit@3"] == "0.710" and rows[1]["bleu3"] == "21.00"


def test_every_plot_link_is_a_png_in_the_report_folder(report):
    path, markdown = report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(links) == sorted(["retrieval-epqa-dev.png", "generation-epqa-dev.png", "retrieval-hetpqa-test.png",
                                    "generation-hetpqa-test.png", "lambda-sweep.png", "efficiency.png"])
    for link in links:
        image = (path.parent / link).read_bytes()
        assert image.startswith(PNG_MAGIC) and len(image) > 5_000, link


def test_report_without_sweep_or_generation_leaves_those_plots_out(tmp_path):
    results = _results(lambdas=())
    del results["systems"]["bsharedrag"]["eval"]["hetpqa-test"]["generation"]
    del results["systems"]["bsharedrag"]["efficiency"]
    results["systems"]["empty"] = {"group": "ablation"}
    markdown = write_report(results, tmp_path).read_text(encoding="utf-8")
    assert "No fully shared systems with a λ were compared." in markdown
    assert "No system was timed." in markdown
    assert "No system has generation metrics on hetpqa-test." in markdown
    assert "- **empty** (ablation): –" in markdown
    assert sorted(file.name for file in tmp_path.glob("*.png")) == [
        "generation-epqa-dev.png", "retrieval-epqa-dev.png", "retrieval-hetpqa-test.png"]


def test_sweep_with_lambda_zero_still_plots(tmp_path):
    markdown = write_report(_results(lambdas=(0.0, 0.5)), tmp_path).read_text(encoding="utf-8")
    assert [row["λ"] for row in _table(markdown, "## λ sweep (fully shared)")] == ["0", "0.5"]
    assert (tmp_path / "lambda-sweep.png").read_bytes().startswith(PNG_MAGIC)


def test_load_results_reads_a_comparison_and_rejects_other_files(tmp_path):
    good = tmp_path / "compare.json"
    good.write_text(json.dumps(_results()), encoding="utf-8")
    assert load_results(good)["machine"] == "2-core Intel Xeon, 24 GiB, no GPU"

    other = tmp_path / "results.json"
    other.write_text(json.dumps({"retrieval": {"bsharedrag": {"hit@3": 0.8}}}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"results\.json is not a comparison results file.*'systems'"):
        load_results(other)

    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json is not JSON"):
        load_results(broken)


def test_intervals_and_paired_differences_from_bsharedrag_are_shown(tmp_path):
    results = _results()
    ours = {f"q{i}": {"hit@3": 1.0, "ndcg@10": 0.8} for i in range(60)}
    worse = {f"q{i}": {"hit@3": float(i % 2), "ndcg@10": 0.8} for i in range(60)}
    results["systems"]["bsharedrag"]["per_query"] = {"epqa-dev": {"retrieval": ours}}
    results["systems"]["bsharedrag"]["intervals"] = {"epqa-dev": {"retrieval": {"hit@3": [0.76, 0.86]}}}
    results["systems"]["bm25"]["per_query"] = {"epqa-dev": {"retrieval": worse}}
    markdown = write_report(results, tmp_path).read_text(encoding="utf-8")
    rows = _by_system(_table(markdown, "## epqa-dev", "### Retrieval"))
    assert rows["bsharedrag"]["hit@3"] == "0.810 [0.760, 0.860]" and rows["bm25"]["hit@3"] == "0.830"
    paired = _by_system(_table(markdown, "## epqa-dev", "### Retrieval",
                               "Paired differences from `bsharedrag` on the same queries (95% paired bootstrap "
                               "interval; * where it excludes zero):"))
    assert paired["bm25"]["hit@3 − bsharedrag"].startswith("-0.500 [") and paired["bm25"]["hit@3 − bsharedrag"].endswith("*")
    assert not paired["bm25"]["ndcg@10 − bsharedrag"].endswith("*")  # identical scores: no difference
    assert (tmp_path / "retrieval-epqa-dev.png").read_bytes().startswith(PNG_MAGIC)
