"""The paper's comparison: backbone-shared, separate and fully shared RAG, with ablations.

`compare(config)` builds each system of `config.compare.systems` as a run folder
`RUN/systems/<name>` (its config is the base config plus the system's overrides), evaluates it on
the evaluation split and on the generalisation datasets, times it serving, and writes everything
to `RUN/compare.json`, the input of `report.write_report`. A system adopts every artefact another
system (or a `compare.reuse` run) built with the same fingerprint, so ablations that change one
stage rebuild only that stage and what depends on it; evaluations and timings are artefacts too,
so a second `compare` redoes only what changed.

Each system's entry in `compare.json` carries a `key`: a fingerprint of its settings with every
dataset folder named by its content, not its place. A `compare` that finds an entry with the same
key in the `compare.json` already in RUN keeps it and builds nothing for that system, so a
comparison too long for one sitting (or one machine) is completed across several: copy the
`compare.json` of the earlier runs into the new run folder and run the same compare again. Entries
whose key still holds are kept whether or not the systems list names them, and `compare.json` is
rewritten after every system, so a stopped compare loses no result.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, CompareConfig, deep_merge, fingerprint
from .files import file_hash, write_text_atomic
from .pipeline import run_stages, stage_names
from .run import Artefact, Run, dataset_id

__all__ = ["System", "compare", "system_config", "systems"]

log = logging.getLogger(__name__)
_BASELINES = {
    "bm25": "BM25 (bm25s, jieba for Chinese words)",
    "encoder": "off-the-shelf all-MiniLM-L6-v2 bi-encoder",
    "zero_shot": "the domain backbone without the generator adapter, same passages and prompt",
}


@dataclass(frozen=True)
class System:
    name: str
    group: str  # "system", "ablation" or "sweep"
    description: str
    overrides: dict = field(default_factory=dict)  # config fields that differ from the base config
    top_k: int | None = None  # passages per prompt at evaluation (None: the generator's top_k)
    weight: float | None = None  # λ of a fully shared system
    retrieval: str = "bsharedrag"  # the evaluated retrieval system recorded as this system's retrieval row

    @property
    def measures_efficiency(self) -> bool:
        return self.top_k is None  # a top-k variant serves with the very same artefacts


def _fully_shared(weight: float) -> System:
    return System(f"fully_shared-l{weight:g}", "sweep",
                  f"one adapter trained on L_gen + {weight:g}·L_ret on the continually pre-trained backbone",
                  {"architecture": "fully_shared", "fully_shared_lambda": weight}, weight=weight)


def _is_number(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


def systems(settings: CompareConfig) -> list[System]:
    """The systems named in `settings.systems`, in that order.

    `fully_shared` expands to one system per λ in `settings.lambdas`; `fully_shared-l<λ>` names one.
    """
    catalogue = {
        "bsharedrag": [System("bsharedrag", "system", "retriever and generator adapters on the continually "
                              "pre-trained backbone (BSharedRAG)")],
        "separate": [System("separate", "system", "off-the-shelf MiniLM retriever; generator adapter on the "
                            "base backbone without continual pre-training",
                            {"architecture": "separate", "pretrain": {"enabled": False}})],
        "fully_shared": [_fully_shared(weight) for weight in settings.lambdas],
        "no_cpt": [System("no_cpt", "ablation", "BSharedRAG without continual pre-training",
                          {"pretrain": {"enabled": False}})],
        "random_negatives": [System("random_negatives", "ablation", "BSharedRAG with random instead of "
                                    "BM25-mined hard negatives", {"mine": {"random_negatives": True}})],
        "no_passages": [System("no_passages", "ablation", "BSharedRAG with a generator trained and asked "
                               "without passages (question to answer)", {"generator": {"with_passages": False}})],
        "rerank": [System("rerank", "system", "BSharedRAG with a third adapter on the backbone, a reranker of the "
                          "first stage's top reranker.depth", {"reranker": {"enabled": True}},
                          retrieval="bsharedrag+rerank")],
    }
    chosen = []
    for name in settings.systems:
        if name in catalogue:
            chosen += catalogue[name]
        elif name.startswith("fully_shared-l") and _is_number(name[len("fully_shared-l"):]):
            chosen.append(_fully_shared(float(name[len("fully_shared-l"):])))
        elif name.startswith("top") and name[3:].isdigit() and int(name[3:]) > 0:
            k = int(name[3:])
            chosen.append(System(name, "ablation", f"BSharedRAG answering from the top {k} passages", top_k=k))
        else:
            raise ValueError(f"unknown system {name!r}; known: {sorted(catalogue)}, fully_shared-l<λ> "
                             "(e.g. fully_shared-l0.3) and top<K> (e.g. top1, top5)")
    names = [s.name for s in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"a system is listed twice in compare.systems: {settings.systems}")
    return chosen


def system_config(config: Config, system: System) -> Config:
    base = json.loads(config.model_dump_json())
    merged = deep_merge(base, {**system.overrides, "run_dir": str(Run(config).system_folder(system.name))})
    return Config.model_validate(merged)


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores {model}, {memory:.0f} GiB, {platform.system()}"


def _notes(config: Config) -> list[str]:
    answered = (f"at most {config.eval.max_generation_queries}" if config.eval.max_generation_queries
                else "all")
    return [f"Generation: {answered} queries with reference answers per dataset, greedy, "
            f"{config.eval.max_new_tokens} new tokens; retrieval: every query of the split (or its seeded sample).",
            "Efficiency: each system served in its own process (peak RSS is VmHWM), searches one question at a "
            f"time ({config.compare.efficiency_queries} timed), {config.compare.efficiency_answers} streamed answers; "
            "index_seconds is the embedding time recorded when that index was built, possibly by an earlier run "
            "whose artefact this one adopted."]


def _content_named(value):
    """`value` with every dataset folder (a path holding corpus.jsonl) replaced by a hash of its files."""
    if isinstance(value, dict):
        return {key: _content_named(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_content_named(item) for item in value]
    if isinstance(value, str) and _is_dataset_folder(value):
        folder = Path(value)
        return "dataset:" + file_hash(folder / "corpus.jsonl", folder / "queries.jsonl", *sorted(folder.glob("qrels/*.tsv")))
    return value


def _is_dataset_folder(value: str) -> bool:
    try:
        return bool(value) and (Path(value) / "corpus.jsonl").is_file()
    except OSError:  # a setting's text too long for a file name (a system prompt) is no folder
        return False


def _system_key(config: Config, system: System, datasets: list) -> str:
    """What a system's results depend on: its settings, the evaluation datasets and knobs; not file places."""
    settings = json.loads(system_config(config, system).model_dump_json(exclude={"run_dir", "compare"}))
    del settings["backbone"]["cache_dir"]
    knobs = config.compare.model_dump(include={"efficiency_queries", "efficiency_answers"})
    evaluated = [[name, str(data), split, max_queries] for name, data, split, max_queries in datasets]
    return fingerprint(_content_named([settings, evaluated]), system.top_k, knobs)


def _upstream_ids(run: Run) -> dict:
    return run.ids("pretrain", "retriever", "index", "generator")


def _evaluation(run: Run, system: System, name: str, data: Path, split: str,
                max_queries: int | None, baselines: bool) -> dict:
    """The system's evaluation on one dataset split (with the baselines when asked), cached as an artefact."""
    from .evaluate import evaluate

    eval_settings = run.config.eval.model_copy(update={
        "systems": ["bsharedrag", "bm25", "encoder"] if baselines else ["bsharedrag"],
        "generation_systems": ["bsharedrag", "zero_shot"] if baselines else ["bsharedrag"],
    })
    settings = {**json.loads(eval_settings.model_dump_json(exclude={"data", "split"})),
                "top_k": system.top_k, "max_queries": max_queries}
    inputs = {**_upstream_ids(run), "data": [str(data), split, dataset_id(data, split)]}
    artefact = Artefact(run.compare_folder(name), settings, inputs)
    if artefact.is_fresh():
        return json.loads(artefact.results_file.read_text())
    log.info("compare: evaluating %s on %s", system.name, name)
    building = artefact.start()
    results = evaluate(run.with_eval(eval_settings), data, split, building / artefact.results_file.name,
                       system.top_k, max_queries)
    artefact.finish({"queries": results["queries"]})
    return results


def _efficiency(run: Run, settings: CompareConfig) -> dict:
    from .efficiency import measure_in_subprocess

    knobs = {"queries": settings.efficiency_queries, "answers": settings.efficiency_answers}
    artefact = Artefact(run.compare_folder("efficiency"), knobs, _upstream_ids(run))
    if not artefact.is_fresh():
        log.info("compare: timing %s", run.folder)
        building = artefact.start()
        measured = measure_in_subprocess(run.folder, **knobs)
        (building / artefact.results_file.name).write_text(json.dumps(measured, indent=2))
        artefact.finish({})
    return json.loads(artefact.results_file.read_text())


def compare(config: Config, command: str = "bsharedrag compare") -> dict:
    """Build, evaluate and time every system; returns (and writes to RUN/compare.json) the results."""
    root = Run(config)
    chosen = systems(config.compare)
    folders = {s.name: root.system_folder(s.name) for s in chosen}
    datasets = [(f"{Path(config.eval.data).name}-{config.eval.split}", Path(config.eval.data), config.eval.split, None)]
    datasets += [(f"{Path(ref.path).name}-{ref.split}", Path(ref.path), ref.split, ref.max_queries)
                 for ref in config.compare.generalisation]
    started = time.time()
    previous = json.loads(root.compare_results.read_text()) if root.compare_results.exists() else {}
    results: dict = {
        "command": command,
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "notes": [*_notes(config), *config.compare.notes],
        "systems_listed": [system.name for system in chosen],
        "datasets": {name: previous["datasets"][name] for name, *_ in datasets if name in previous.get("datasets", {})},
        "systems": {},
    }
    recorded = _recorded(previous.get("systems", {}), config, datasets)
    for system in chosen:
        with_baselines = system.overrides == {} and system.top_k is None  # bsharedrag carries the baselines
        if system.name in recorded:
            log.info("compare: %s is in %s with the same settings (%s); kept", system.name, root.compare_results,
                     recorded[system.name].get("date"))
            results["systems"][system.name] = recorded[system.name]
            if with_baselines:
                results["systems"].update({name: recorded[name] for name in _BASELINES if name in recorded})
            continue
        key = _system_key(config, system, datasets)
        others = [folder for name, folder in folders.items() if name != system.name] + list(config.compare.reuse)
        run = Run(system_config(config, system), reuse=others)
        run_stages(run, stage_names()[:-1])  # every stage but the run's own eval: compare evaluates below
        entry = {"group": system.group, "description": system.description, "lambda": system.weight,
                 "key": key, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": results["machine"], "eval": {}}
        results["systems"][system.name] = entry
        for name, data, split, max_queries in datasets:
            evaluated = _evaluation(run, system, name, data, split, max_queries, with_baselines)
            results["datasets"][name] = {"data": str(data), "split": split, "queries": evaluated["queries"],
                                         "generation_queries": evaluated.get("generation_queries")}
            _record(entry, name, evaluated, system.retrieval, as_system="bsharedrag")
            if with_baselines:
                for baseline, description in _BASELINES.items():
                    slot = results["systems"].setdefault(baseline, {"group": "baseline", "description": description,
                                                                     "lambda": None, "key": key, "eval": {}})
                    _record(slot, name, evaluated, baseline)
        if system.measures_efficiency:
            entry["efficiency"] = _efficiency(run, config.compare)
        results["seconds"] = round(time.time() - started, 1)
        _write(root.compare_results, results, recorded)  # after every system: a stopped compare still reports
        del run
        gc.collect()  # the next system loads its own backbone; free this one's first
    return _write(root.compare_results, results, recorded)


def _record(entry: dict, dataset: str, evaluated: dict, system: str, as_system: str | None = None) -> None:
    """Copy `system`'s means, 95% intervals and per-query scores on `dataset` from one evaluation into `entry`:
    its retrieval row, and the answers of `as_system` (default: `system`), the name they are evaluated under."""
    names = {"retrieval": system, "generation": as_system or system}
    for key, source in (("eval", evaluated), ("intervals", evaluated.get("intervals", {})),
                        ("per_query", evaluated.get("per_query", {}))):
        found = {section: source[section][name] for section, name in names.items() if name in source.get(section, {})}
        if found:
            entry.setdefault(key, {})[dataset] = found


def _recorded(earlier: dict, config: Config, datasets: list) -> dict:
    """The systems of an earlier compare.json whose recorded key is the one their settings give now.

    Baselines are evaluated with bsharedrag, so they hold while its key does.
    """
    keys = {}  # by the system whose settings an entry depends on: each key is computed once
    valid = {}
    for name, entry in earlier.items():
        owner = "bsharedrag" if name in _BASELINES else name
        if owner not in keys:
            try:
                (system,) = systems(CompareConfig(systems=[owner]))
            except ValueError:
                continue
            keys[owner] = _system_key(config, system, datasets)
        if entry.get("key") == keys[owner]:
            valid[name] = entry
    return valid


def _write(path: Path, results: dict, recorded: dict) -> dict:
    """Writes `results` with every still valid earlier result that this compare did not redo (listed or not)."""
    results = {**results, "systems": {**results["systems"], **{
        name: entry for name, entry in recorded.items() if name not in results["systems"]}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(results, indent=2, ensure_ascii=False))
    return results
