"""The stages of a run, in order, each skipped while its artefact is up to date.

    pretrain -> synth -> mine -> retriever -> index -> reranker -> generator -> eval

A stage is a row of `STAGES`: its name, what it is built from (`inputs`: the settings and the
upstream ids that make its fingerprint) and how it is built (`build`: writes the artefact folder,
returns its statistics). One `SharedBackbone`, loaded once by the `Run`, carries both adapters
through the later stages, so no stage repeats another's work: the index built for serving also
supplies the passages that the generator is trained on. A new stage is a new row.

`config.architecture` picks what the retriever and generator stages make: `backbone_shared`
trains two adapters; `separate` uses an off-the-shelf encoder as the retriever (nothing to train)
and a generator adapter; `fully_shared` trains one adapter on L_gen + λ·L_ret in the retriever
stage and uses it for generation too. A stage whose artefact another run folder (`Run.reuse`)
already built with the same fingerprint adopts it instead of building it again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from . import distributed
from .config import Config
from .data import read_corpus
from .files import file_hash
from .memory import free_memory, peak_rss_mib, reset_peak_rss
from .model.backbone import GENERATOR, RERANKER, RETRIEVER, SharedBackbone, resolve_model_source
from .run import Artefact, Run, dataset_id

__all__ = ["STAGES", "Stage", "refuse_unbuilt_settings", "run_stages", "stage_names"]

log = logging.getLogger(__name__)

# How a stage runs, not what it makes: they leave the fingerprint (and the built artefacts) as they are.
_NOT_SETTINGS = {"checkpoint_every", "log_every", "decode_together", "micro_batch_tokens", "pad_to_multiple"}
# Settings added after artefacts were built without them: at the value that the earlier code behaved as,
# they leave the fingerprint as it was, so an upgrade rebuilds nothing they would not change.
_ADDED_SETTINGS = {"document_end": "eos", "engine": "native", "seed": None}


def _settings(section, exclude: set[str] = frozenset()) -> dict:
    skipped = (_NOT_SETTINGS | exclude) & set(type(section).model_fields)
    skipped |= {key for key, earlier in _ADDED_SETTINGS.items() if getattr(section, key, None) == earlier}
    return json.loads(section.model_dump_json(exclude=skipped))


def _seed(run: Run, section) -> int:
    """A training stage's seed: its own (`seed` of its section) or the run's."""
    return run.config.seed if section.seed is None else section.seed


@dataclass(frozen=True)
class Stage:
    name: str  # also the name of its artefact folder and of its `bsharedrag` command (`command` where it differs)
    summary: str
    inputs: Callable[[Run], tuple[dict, dict]]  # run -> (settings, inputs): what the artefact's fingerprint hashes
    build: Callable[[Run, Path], tuple[dict, dict]]  # (run, folder) -> (statistics, extra manifest fields)
    command: str | None = None
    shared: bool = False  # over several processes every process builds it (each its share); else the main one


# --- pretrain ---------------------------------------------------------------------------


def _pretrain_inputs(run: Run) -> tuple[dict, dict]:
    settings = _settings(run.config.pretrain)
    settings["datasets"] = [[str(p), file_hash(Path(p) / "corpus.jsonl")] for p in run.config.pretrain.datasets]
    return settings, {"base": run.config.backbone.model, "seed": run.config.seed}


def _pretrain(run: Run, folder: Path) -> tuple[dict, dict]:
    from .train.pretrain import domain_texts, pretrain

    config = run.config
    base = resolve_model_source(config.backbone)
    if not config.pretrain.enabled:
        return {"skipped": "pretrain.enabled is false"}, {"path": str(base)}
    run.release()
    trainee = SharedBackbone.load(config.backbone, base)
    texts = domain_texts(config.pretrain, config.strict_data)
    stats = pretrain(trainee, texts, config.pretrain, folder / "model", _seed(run, config.pretrain))
    return stats, {"model_folder": "model"}  # relative: the artefact is built beside its final folder


# --- synth ------------------------------------------------------------------------------


def _synth_inputs(run: Run) -> tuple[dict, dict]:
    config = run.config
    inputs: dict = {"seed": config.seed}
    if config.synth.enabled:  # disabled, it writes nothing: no corpus to hash
        corpus = Path(config.synth.corpus or config.index.corpus)
        inputs |= {"corpus": [str(corpus), file_hash(corpus / "corpus.jsonl")],
                   "writer": config.synth.endpoint or config.synth.writer or config.backbone.model}
    return _settings(config.synth), inputs


def _synth(run: Run, folder: Path) -> tuple[dict, dict]:
    from .synth import synthesise

    config = run.config
    if not config.synth.enabled:
        return {"skipped": "synth.enabled is false"}, {}
    run.release()  # the writer is a model of its own
    source = None if config.synth.endpoint else (config.synth.writer or resolve_model_source(config.backbone))
    corpus = Path(config.synth.corpus or config.index.corpus)
    written = synthesise(corpus, folder / "data", config.synth, config.seed, model_source=source)
    return {"kept": written["filters"]["kept"], "train": written["queries"]["train"],
            "dev": written["queries"]["dev"]}, {}


# --- mine -------------------------------------------------------------------------------


def _mine_inputs(run: Run) -> tuple[dict, dict]:
    config, refs = run.config, run.config.retriever.datasets
    inputs = {"datasets": run.dataset_inputs(refs), "seed": config.seed,
              "judged_per_product": [str(ref.path) for ref in refs if ref.judged_per_product]}
    if config.mine.method == "dense" and not config.mine.random_negatives:
        inputs["backbone"] = run.manifest("pretrain")["id"]
    return _settings(config.mine), inputs


def _mine(run: Run, folder: Path) -> tuple[dict, dict]:
    from .train.mining import mine_negatives

    config = run.config
    negatives: dict[str, list[str]] = {}
    for ref in config.retriever.datasets:
        dataset = run.dataset(ref)
        negatives.update(mine_negatives(dataset, _scorer(run, dataset), config.mine, config.seed,
                                        ref.judged_per_product))
    (folder / run.negatives_file.name).write_text(json.dumps(negatives))
    counts = [len(v) for v in negatives.values()]
    return {"queries": len(negatives), "mean_negatives": sum(counts) / max(1, len(counts))}, {}


def _scorer(run: Run, dataset):
    """What ranks the corpus for each training question: BM25, the backbone as an encoder, or nothing (random)."""
    config = run.config
    if config.mine.random_negatives:
        return None
    if config.mine.method == "bm25":
        from .model.baselines import BM25Retriever

        return BM25Retriever(dataset.corpus).scores
    from .model.encoder import Encoder

    if run.is_built(RETRIEVER):
        encoder = run.encoder()
    else:  # the domain backbone alone, embedding as its retriever will
        encoder = Encoder(run.backbone(), config.retriever, None, end_id=run.document_end_id())
    passages = encoder.embed_passages(dataset.corpus, config.index.batch_tokens, desc="embed for mining")
    return lambda questions: encoder.embed_queries(questions) @ passages.T


# --- retriever --------------------------------------------------------------------------


def _retriever_inputs(run: Run) -> tuple[dict, dict]:
    config = run.config
    inputs = {"backbone": run.manifest("pretrain")["id"], "negatives": run.manifest("mine")["id"], "seed": config.seed}
    if config.architecture == "separate":
        return {"architecture": "separate", "encoder": config.retriever.encoder_model}, inputs
    settings = _settings(config.retriever, exclude={"encoder_model"})
    if config.architecture == "fully_shared":
        settings = {"architecture": "fully_shared", "lambda": config.fully_shared_lambda,
                    "retriever": settings, "generator": _settings(config.generator)}
        inputs["generator_datasets"] = run.dataset_inputs(config.generator.datasets)
    return settings, inputs


def _retriever(run: Run, folder: Path) -> tuple[dict, dict]:
    from .train.retriever import train_retriever, training_examples

    config = run.config
    if config.architecture == "separate":
        return {"encoder": config.retriever.encoder_model, "trained": False}, {}
    backbone = run.backbone()
    backbone.remove_adapter(RETRIEVER)  # retraining starts from a fresh adapter
    negatives = json.loads(run.negatives_file.read_text())
    examples = training_examples([run.dataset(r) for r in config.retriever.datasets], negatives)
    end_id = run.document_end_id()
    recorded = {"end_token": backbone.tokenizer.convert_ids_to_tokens(end_id)}  # what `Run.encoder` pools on
    if config.architecture == "fully_shared":
        from .train.joint import train_fully_shared

        datasets = [run.dataset(r) for r in config.generator.datasets]
        return train_fully_shared(backbone, examples, datasets, config.retriever, config.generator,
                                  config.fully_shared_lambda, folder, _seed(run, config.retriever), end_id), recorded
    return train_retriever(backbone, examples, config.retriever, folder, _seed(run, config.retriever), end_id), recorded


# --- index ------------------------------------------------------------------------------


def _index_inputs(run: Run) -> tuple[dict, dict]:
    corpus = Path(run.config.index.corpus) / "corpus.jsonl"
    return _settings(run.config.index), {**run.index_ids(), "corpus": file_hash(corpus)}


def _index(run: Run, folder: Path) -> tuple[dict, dict]:
    from .model.encoder import DenseRetriever
    from .model.hybrid import LexicalIndex, fit_hybrid, validation_pairs
    from .model.index import VectorIndex, build_index

    settings = run.config.index
    corpus = Path(settings.corpus) / "corpus.jsonl"
    docs = read_corpus(corpus, run.config.strict_data)
    manifest = run.index_manifest(file_hash(corpus))
    stats = build_index(run.encoder(), docs, folder, manifest, settings.batch_tokens)  # each process its share
    if settings.first_stage == "hybrid" and distributed.is_main():  # the fusion weight the served first stage uses
        index = VectorIndex.open(folder)
        pairs, source = validation_pairs(settings.corpus, docs, settings.fusion_validation_queries, run.config.seed)
        hybrid = fit_hybrid(DenseRetriever(run.encoder(), index), LexicalIndex(index), pairs, source, settings.fusion,
                            run.config.seed)
        index.manifest["fusion"] = stats["fusion"] = hybrid.chosen
        index.save()
    return stats, {}


# --- reranker ---------------------------------------------------------------------------


def _reranker_inputs(run: Run) -> tuple[dict, dict]:
    config = run.config
    if not config.reranker.enabled:  # disabled, it trains nothing: its other settings change nothing
        return {"enabled": False}, {}
    inputs = {**run.ids("pretrain", "mine", "retriever"), "datasets": run.dataset_inputs(config.reranker.datasets),
              "seed": config.seed}
    return _settings(config.reranker), inputs


def _reranker(run: Run, folder: Path) -> tuple[dict, dict]:
    from .train.mining import retriever_misses
    from .train.reranker import rerank_examples, train_reranker
    from .train.retriever import training_examples

    settings = run.config.reranker
    if not settings.enabled:
        return {"skipped": "reranker.enabled is false"}, {}
    datasets = [run.dataset(ref) for ref in settings.datasets]
    misses: dict[str, list[str]] = {}
    for dataset in datasets:  # what the first stage ranks high but is not relevant: what reranking must fix
        misses.update(retriever_misses(dataset, run.retriever(dataset.path), settings.negatives_per_query,
                                       settings.depth))
    mined = json.loads(run.negatives_file.read_text())
    examples = rerank_examples(training_examples(datasets, mined), training_examples(datasets, misses))
    free_memory()
    backbone = run.backbone()
    backbone.remove_adapter(RERANKER)  # retraining starts from a fresh adapter
    return train_reranker(backbone, examples, settings, folder, _seed(run, settings)), {}


# --- generator --------------------------------------------------------------------------


def _generator_inputs(run: Run) -> tuple[dict, dict]:
    config = run.config
    inputs = {"backbone": run.manifest("pretrain")["id"], "retriever": run.manifest("retriever")["id"],
              "datasets": run.dataset_inputs(config.generator.datasets), "seed": config.seed}
    return _settings(config.generator), inputs


def _generator(run: Run, folder: Path) -> tuple[dict, dict]:
    from .train.generator import build_triples, train_generator

    config = run.config
    if config.architecture == "fully_shared":
        return {"trained": False, "shared_with": "retriever"}, {}
    backbone = run.backbone()
    backbone.remove_adapter(GENERATOR)
    datasets = [run.dataset(r) for r in config.generator.datasets]
    retrievers = [run.retriever(dataset.path) for dataset in datasets] if config.generator.with_passages else None
    judged = [ref.judged_per_product for ref in config.generator.datasets]
    seed = _seed(run, config.generator)
    triples = build_triples(datasets, retrievers, config.generator, seed, judged)
    del retrievers
    free_memory()  # the heap that embedding the corpora fragmented, before training grows on it
    return train_generator(backbone, triples, config.generator, folder, seed), {}


# --- eval -------------------------------------------------------------------------------


def _eval_inputs(run: Run) -> tuple[dict, dict]:
    inputs = run.ids("pretrain", "retriever", "index", "generator")
    if run.config.reranker.enabled:
        inputs |= run.ids("reranker")
    inputs["data"] = dataset_id(run.data_path(run.config.eval.data), run.config.eval.split)
    return _settings(run.config.eval), inputs


def _eval(run: Run, folder: Path) -> tuple[dict, dict]:
    from .evaluate import evaluate

    results = evaluate(run, run.data_path(run.config.eval.data), run.config.eval.split,
                       folder / run.eval_results().name)
    return {"queries": results["queries"]}, {}


STAGES: tuple[Stage, ...] = (
    Stage("pretrain", "Stage 1: continual pre-training of the backbone on the domain corpus.",
          _pretrain_inputs, _pretrain, shared=True),
    Stage("synth", "Write synthetic questions and answers from the catalogue (when synth.enabled).",
          _synth_inputs, _synth),
    Stage("mine", "Stage 2: mine hard negatives for the retriever's training queries.", _mine_inputs, _mine),
    Stage("retriever", "Stage 3: train the retriever adapter (InfoNCE with in-batch and hard negatives).",
          _retriever_inputs, _retriever, command="train-retriever", shared=True),
    Stage("index", "Embed the catalogue (index.corpus) with the retriever into the run's vector index.",
          _index_inputs, _index, shared=True),
    Stage("reranker", "Train the reranker adapter (listwise softmax over mined negatives and retriever misses), "
          "when reranker.enabled.", _reranker_inputs, _reranker, command="train-reranker", shared=True),
    Stage("generator", "Stage 4: train the generator adapter on retrieved passages (loss on answer tokens only).",
          _generator_inputs, _generator, command="train-generator", shared=True),
    Stage("eval", "Evaluate the run and the baselines on eval.data (retrieval and answers).", _eval_inputs, _eval),
)


def stage_names() -> tuple[str, ...]:
    return tuple(stage.name for stage in STAGES)


def run_stages(run: Run | Config, stages: tuple[str, ...] | None = None, rebuild: Collection[str] = ()
               ) -> dict[str, dict]:
    """Build (or resume) `stages` of `run` in table order, skipping those up to date; returns their manifests.

    The stages named in `rebuild` are built again even when up to date (what was built from them is
    then stale and rebuilt too); each keeps its previous artefact until the new one is complete.
    Launched over several processes (`accelerate launch`, `torchrun`), every process trains its share
    of the shared stages (`Stage.shared`: training and indexing), the main one alone builds the others, and the main one
    writes every artefact.
    """
    run = run if isinstance(run, Run) else Run(run)
    names = stage_names()
    stages = names if stages is None else tuple(stages)
    unknown = [s for s in (*stages, *rebuild) if s not in names]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(names)}")
    distributed.init()
    if distributed.is_main():
        run.save_config()
    return {stage.name: _run_stage(run, stage, stage.name in rebuild) for stage in STAGES if stage.name in stages}


def _run_stage(run: Run, stage: Stage, force: bool) -> dict:
    distributed.barrier()  # over several processes, every one sees the same finished stages
    artefact = run.artefact(stage.name, *stage.inputs(run))
    if artefact.is_fresh() and not force:
        log.info("%s: up to date in %s", stage.name, artefact.folder)
        return artefact.manifest
    if not distributed.is_main():
        return _follow(run, stage, artefact)
    if not force and distributed.world_size() == 1 and (adopted := run.adopt(stage.name, artefact)):
        return adopted
    log.info("%s: building %s", stage.name, artefact.folder)
    started = time.time()
    measured = reset_peak_rss()
    with distributed.lockstep() if stage.shared else contextlib.nullcontext():
        stats, extra = stage.build(run, artefact.start())
    stats["stage_seconds"] = round(time.time() - started, 1)
    if measured:
        stats["peak_rss_mib"] = round(peak_rss_mib())  # this stage's own peak, what earlier stages left included
    free_memory()  # what the stage built and dropped (a trainee model, optimiser state) goes before the next one
    manifest = artefact.finish(stats, **extra)
    distributed.barrier()
    return manifest


def _follow(run: Run, stage: Stage, artefact: Artefact) -> dict:
    """A process other than the main one: it takes its share of a training stage, in a folder of its own
    that is discarded (the main process writes the artefact), and waits for the main process."""
    if stage.shared:
        scratch = run.process_artefact(stage.name, artefact.settings, artefact.inputs, distributed.rank())
        with distributed.lockstep():
            stage.build(run, scratch.start())
        scratch.discard()
        free_memory()
    distributed.barrier()
    return run.manifest(stage.name)


def refuse_unbuilt_settings(run: Run, built_with: Run, skip: tuple[str, ...] = ("eval",)) -> None:
    """Raise ValueError when `run`'s settings differ from `built_with`'s where a built stage depends on them.

    A command that reads a built run (search, ask, serve, docs, eval) cannot apply such a setting: it
    would answer with what the run was built with. `skip` names the stages the command itself redoes.
    """
    def fingerprint(opened: Run, stage: Stage) -> str:
        return opened.artefact(stage.name, *stage.inputs(opened)).fingerprint

    # Both fingerprints come from this code, so a setting that a newer version added refuses nothing.
    changed = [stage.name for stage in STAGES if stage.name not in skip and run.is_built(stage.name)
               and fingerprint(run, stage) != fingerprint(built_with, stage)]
    if not changed:
        return
    ours, theirs = _flat(json.loads(run.config.model_dump_json())), _flat(json.loads(built_with.config.model_dump_json()))
    differences = ", ".join(f"{key}={theirs.get(key)!r} (given {ours.get(key)!r})"
                            for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key))
    raise ValueError(f"{run.folder} was built with {differences}: this command cannot apply a setting that "
                     f"stage(s) {', '.join(changed)} were built with; leave it out, or rebuild with "
                     f"`bsharedrag run --run {run.folder} --set ...`")


def _flat(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
