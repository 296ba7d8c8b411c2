"""The stages of a run, in order, each skipped while its artefact is up to date.

    pretrain -> mine -> retriever -> index -> generator -> eval

One `SharedBackbone` is loaded once and carries both adapters through the later stages, so no
stage repeats another's work: the index built for serving also supplies the passages that the
generator is trained on.

`config.architecture` picks what the retriever and generator stages make: `backbone_shared`
trains two adapters; `separate` uses an off-the-shelf encoder as the retriever (nothing to train)
and a generator adapter; `fully_shared` trains one adapter on L_gen + λ·L_ret in the retriever
stage and uses it for generation too. A stage whose artefact another run folder (`reuse`) already
built with the same fingerprint adopts it through a symlink instead of building it again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from .artefacts import Artefact, file_hash
from .backbone import SharedBackbone, resolve_model_source
from .config import Config, DatasetRef
from .data import Dataset, load_dataset

__all__ = ["STAGES", "Pipeline"]

log = logging.getLogger(__name__)

STAGES = ("pretrain", "mine", "retriever", "index", "generator", "eval")
_NOT_SETTINGS = {"checkpoint_every", "log_every"}  # they change how a stage runs, not what it makes


def _settings(section) -> dict:
    return json.loads(section.model_dump_json(exclude=_NOT_SETTINGS & set(type(section).model_fields)))


def dataset_id(path: Path, split: str) -> str:
    path = Path(path)
    return file_hash(path / "corpus.jsonl", path / "queries.jsonl", path / "qrels" / f"{split}.tsv")


class Pipeline:
    """Runs (or resumes) the stages of one run folder; a notebook can call each stage."""

    def __init__(self, config: Config, reuse: list[Path] | tuple = ()):
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.reuse = [Path(folder) for folder in reuse]
        self._backbone: SharedBackbone | None = None
        self._sentence_encoder = None
        self._datasets: dict[tuple, Dataset] = {}

    def with_eval(self, settings) -> Pipeline:
        """The same run with other evaluation settings, sharing the loaded backbone and datasets."""
        other = Pipeline(self.config.model_copy(update={"eval": settings}), self.reuse)
        self.backbone()  # loaded here, so that every pipeline derived from this one shares it
        other._backbone, other._sentence_encoder, other._datasets = self._backbone, self._sentence_encoder, self._datasets
        return other

    # --- shared inputs --------------------------------------------------------------------

    def folder(self, stage: str) -> Path:
        return self.run_dir / stage

    def manifest(self, stage: str) -> dict:
        path = self.folder(stage) / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"stage {stage!r} has not been run in {self.run_dir}; run `bsharedrag {stage}`")
        return json.loads(path.read_text())

    def dataset(self, ref: DatasetRef) -> Dataset:
        key = (str(ref.path), ref.split, ref.max_queries)
        if key not in self._datasets:
            full = load_dataset(ref.path, ref.split, strict=self.config.strict_data)
            self._datasets[key] = full.sample(ref.max_queries, self.config.seed)
        return self._datasets[key]

    def _dataset_inputs(self, refs: list[DatasetRef]) -> list:
        return [[str(r.path), r.split, r.max_queries, dataset_id(r.path, r.split)] for r in refs]

    def backbone_path(self) -> Path:
        return Path(self.manifest("pretrain")["path"])

    def backbone(self) -> SharedBackbone:
        """The domain backbone, loaded once; adapters are attached to it by later stages."""
        if self._backbone is None:
            self._backbone = SharedBackbone.load(self.config.backbone, self.backbone_path())
        return self._backbone

    def ensure_adapter(self, name: str) -> None:
        backbone = self.backbone()
        if name not in backbone.adapters:
            backbone.load_adapter(name, self.folder(name))

    @property
    def generator_adapter(self) -> str:
        """The adapter that writes answers: the retriever's own one in the fully shared architecture."""
        from .generator import ADAPTER as GENERATOR
        from .retriever import ADAPTER as RETRIEVER

        return RETRIEVER if self.config.architecture == "fully_shared" else GENERATOR

    def encoder(self):
        """What embeds questions and passages for this run's indexes (see `DenseRetriever`)."""
        if self.config.architecture == "separate":
            from .baselines import SentenceEncoder

            if self._sentence_encoder is None:
                self._sentence_encoder = SentenceEncoder(self.config.eval.encoder_model)
            return self._sentence_encoder
        from .retriever import ADAPTER, Encoder

        self.ensure_adapter(ADAPTER)
        return Encoder(self.backbone(), self.config.retriever)

    def index_ids(self) -> dict:
        """What an index of this run must have been built with: the backbone and the retriever artefacts."""
        return {"backbone": self.manifest("pretrain")["id"], "adapter": self.manifest("retriever")["id"]}

    # --- stages ---------------------------------------------------------------------------

    def run(self, stages: tuple[str, ...] = STAGES, force: bool = False) -> dict[str, dict]:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config.save(self.run_dir / "config.yaml")
        done = {}
        for stage in STAGES:
            if stage in stages:
                done[stage] = self.run_stage(stage, force)
        return done

    def run_stage(self, stage: str, force: bool = False) -> dict:
        artefact = getattr(self, f"_{stage}_artefact")()
        if artefact.is_fresh() and not force:
            log.info("%s: up to date in %s", stage, artefact.folder)
            return artefact.manifest
        if not force and (adopted := self._adopt(stage, artefact)):
            return adopted
        log.info("%s: building %s", stage, artefact.folder)
        started = time.time()
        artefact.start()
        stats, extra = getattr(self, f"_{stage}")(artefact.folder)
        stats["stage_seconds"] = round(time.time() - started, 1)
        return artefact.finish(stats, **extra)

    def _adopt(self, stage: str, artefact: Artefact) -> dict | None:
        """Link `stage` to the same artefact in a `reuse` run folder, if one was built with this fingerprint."""
        for other in self.reuse:
            source = (other / stage).resolve()
            if source == artefact.folder.resolve() or not (source / "manifest.json").exists():
                continue
            manifest = json.loads((source / "manifest.json").read_text())
            if manifest.get("fingerprint") == artefact.fingerprint:
                folder = artefact.folder
                if folder.is_symlink() or folder.is_file():
                    folder.unlink()
                elif folder.exists():
                    shutil.rmtree(folder)
                folder.parent.mkdir(parents=True, exist_ok=True)
                folder.symlink_to(os.path.relpath(source, folder.parent), target_is_directory=True)
                log.info("%s: adopted %s", stage, source)
                return manifest
        return None

    def _pretrain_artefact(self) -> Artefact:
        settings = _settings(self.config.pretrain)
        settings["datasets"] = [[str(p), file_hash(Path(p) / "corpus.jsonl")] for p in self.config.pretrain.datasets]
        return Artefact(self.folder("pretrain"), settings, {"base": self.config.backbone.model,
                                                            "seed": self.config.seed})

    def _pretrain(self, folder: Path) -> tuple[dict, dict]:
        from .pretrain import domain_texts, pretrain

        base = resolve_model_source(self.config.backbone)
        if not self.config.pretrain.enabled:
            return {"skipped": "pretrain.enabled is false"}, {"path": str(base)}
        self._backbone = None
        trainee = SharedBackbone.load(self.config.backbone, base)
        texts = domain_texts(self.config.pretrain, self.config.strict_data)
        stats = pretrain(trainee, texts, self.config.pretrain, folder / "model", self.config.seed)
        del trainee
        return stats, {"path": str((folder / "model").resolve())}

    def _mine_artefact(self) -> Artefact:
        refs = self.config.retriever.datasets
        inputs = {"datasets": self._dataset_inputs(refs), "seed": self.config.seed,
                  "judged_per_product": [str(ref.path) for ref in refs if ref.judged_per_product]}
        if self.config.mine.method == "dense" and not self.config.mine.random_negatives:
            inputs["backbone"] = self.manifest("pretrain")["id"]
        return Artefact(self.folder("mine"), _settings(self.config.mine), inputs)

    def _mine(self, folder: Path) -> tuple[dict, dict]:
        from .mining import mine_negatives

        negatives: dict[str, list[str]] = {}
        for ref in self.config.retriever.datasets:
            dataset = self.dataset(ref)
            negatives.update(mine_negatives(dataset, self._scorer(dataset), self.config.mine, self.config.seed,
                                            ref.judged_per_product))
        (folder / "negatives.json").write_text(json.dumps(negatives))
        counts = [len(v) for v in negatives.values()]
        return {"queries": len(negatives), "mean_negatives": sum(counts) / max(1, len(counts))}, {}

    def _scorer(self, dataset: Dataset):
        if self.config.mine.random_negatives:
            return None
        if self.config.mine.method == "bm25":
            from .baselines import BM25Retriever

            return BM25Retriever(dataset.corpus).scores
        from .retriever import ADAPTER, Encoder

        adapter = ADAPTER if (self.folder(ADAPTER) / "manifest.json").exists() else None
        if adapter:
            self.ensure_adapter(adapter)
        encoder = Encoder(self.backbone(), self.config.retriever, adapter)
        passages = encoder.embed_passages(dataset.corpus, self.config.index.batch_tokens, desc="embed for mining")
        return lambda questions: encoder.embed_queries(questions) @ passages.T

    def _retriever_artefact(self) -> Artefact:
        architecture = self.config.architecture
        inputs = {"backbone": self.manifest("pretrain")["id"], "negatives": self.manifest("mine")["id"],
                  "seed": self.config.seed}
        settings = _settings(self.config.retriever)
        if architecture == "separate":
            settings = {"architecture": architecture, "encoder": self.config.eval.encoder_model}
        elif architecture == "fully_shared":
            settings = {"architecture": architecture, "lambda": self.config.fully_shared_lambda,
                        "retriever": settings, "generator": _settings(self.config.generator)}
            inputs["generator_datasets"] = self._dataset_inputs(self.config.generator.datasets)
        return Artefact(self.folder("retriever"), settings, inputs)

    def _retriever(self, folder: Path) -> tuple[dict, dict]:
        from .retriever import ADAPTER, train_retriever, training_examples

        if self.config.architecture == "separate":
            return {"encoder": self.config.eval.encoder_model, "trained": False}, {}
        backbone = self.backbone()
        backbone.remove_adapter(ADAPTER)  # retraining starts from a fresh adapter
        negatives = json.loads((self.folder("mine") / "negatives.json").read_text())
        examples = training_examples([self.dataset(r) for r in self.config.retriever.datasets], negatives)
        if self.config.architecture == "fully_shared":
            from .joint import train_fully_shared

            datasets = [self.dataset(r) for r in self.config.generator.datasets]
            return train_fully_shared(backbone, examples, datasets, self.config, folder), {}
        return train_retriever(backbone, examples, self.config.retriever, folder, self.config.seed), {}

    def _index_artefact(self) -> Artefact:
        corpus = Path(self.config.corpus) / "corpus.jsonl"
        inputs = {"backbone": self.manifest("pretrain")["id"], "adapter": self.manifest("retriever")["id"],
                  "corpus": file_hash(corpus)}
        return Artefact(self.folder("index"), _settings(self.config.index), inputs)

    def _index(self, folder: Path) -> tuple[dict, dict]:
        from .data import read_corpus
        from .indexing import build_index

        docs = read_corpus(Path(self.config.corpus) / "corpus.jsonl", self.config.strict_data)
        ids = {**self.index_ids(), "corpus": file_hash(Path(self.config.corpus) / "corpus.jsonl")}
        stats = build_index(self.encoder(), docs, self.config, folder, ids)
        return stats, {}

    def _generator_artefact(self) -> Artefact:
        inputs = {"backbone": self.manifest("pretrain")["id"], "retriever": self.manifest("retriever")["id"],
                  "datasets": self._dataset_inputs(self.config.generator.datasets), "seed": self.config.seed}
        return Artefact(self.folder("generator"), _settings(self.config.generator), inputs)

    def _generator(self, folder: Path) -> tuple[dict, dict]:
        from .generator import ADAPTER, build_triples, train_generator
        from .indexing import retriever_for

        if self.config.architecture == "fully_shared":
            return {"trained": False, "shared_with": "retriever"}, {}
        backbone = self.backbone()
        backbone.remove_adapter(ADAPTER)
        datasets = [self.dataset(r) for r in self.config.generator.datasets]
        with_passages = self.config.generator.with_passages
        retrievers = [retriever_for(self, dataset) for dataset in datasets] if with_passages else None
        triples = build_triples(datasets, retrievers, self.config.generator, self.config.seed)
        return train_generator(backbone, triples, self.config.generator, folder, self.config.seed), {}

    def _eval_artefact(self) -> Artefact:
        inputs = {stage: self.manifest(stage)["id"] for stage in ("pretrain", "retriever", "index", "generator")}
        inputs["data"] = dataset_id(self.config.eval.data, self.config.eval.split)
        return Artefact(self.folder("eval"), _settings(self.config.eval), inputs)

    def _eval(self, folder: Path) -> tuple[dict, dict]:
        from .evaluate import evaluate

        results = evaluate(self, self.config.eval.data, self.config.eval.split, folder / "results.json")
        return {"queries": results["queries"]}, {}
