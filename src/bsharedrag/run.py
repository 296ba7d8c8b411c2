"""One run folder: where every artefact of a run lies, what built it, and loading what was built.

    RUN/config.yaml                  the settings the run was last built with
    RUN/<stage>/manifest.json        a finished stage: settings, inputs, fingerprint, statistics, id
    RUN/.<stage>.building            a stage being built (pending.json: resumable with the same fingerprint);
                                     it replaces RUN/<stage> only once complete, so a failed rebuild loses nothing
    RUN/pretrain/model               the domain backbone (absent when pre-training is off)
    RUN/synth/data                   synthetic questions (BEIR-style); a dataset setting SYNTH names it
    RUN/mine/negatives.json          the mined hard negatives
    RUN/retriever, RUN/generator     the adapters; RUN/retriever/side-indexes/<corpus hash> other corpora's indexes
    RUN/index                        the vector index of the served catalogue
    RUN/reranker                     the reranker adapter (a skipped stage when reranker.enabled is false)
    RUN/eval/results*.json           evaluations
    RUN/systems/<name>, RUN/compare  the systems of `bsharedrag compare`, their evaluations, RUN/compare.json

Downstream manifests record the ids of the upstream artefacts they were built from, so rebuilding an
upstream artefact makes everything built from it stale. This module is the only one that spells a
path inside a run folder; `pipeline` builds the stages, everything else reads them through `Run`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from . import distributed
from .config import Config, DatasetRef, EvalConfig, fingerprint, load_config
from .data import Dataset, load_dataset, read_corpus
from .files import file_hash, remove_path, settle, swap_in, write_text_atomic
from .model.backbone import GENERATOR, RERANKER, RETRIEVER, SharedBackbone

if TYPE_CHECKING:
    from .model.encoder import DenseRetriever
    from .model.hybrid import HybridRetriever
    from .model.index import VectorIndex
    from .model.reranker import RerankedRetriever, Reranker
    from .model.vllm import VllmClient

__all__ = ["Artefact", "Run", "dataset_id"]

log = logging.getLogger(__name__)

_MANIFEST = "manifest.json"
_PENDING = "pending.json"


def dataset_id(path: Path, split: str) -> str:
    """A hash of what a dataset split is: its corpus, its queries and its judgements."""
    path = Path(path)
    return file_hash(path / "corpus.jsonl", path / "queries.jsonl", path / "qrels" / f"{split}.tsv")


SYNTH = Path("SYNTH")  # as a dataset path in the settings: the run's synthetic dataset


class Artefact:
    """One artefact folder: up to date while its settings and inputs hash to the fingerprint it was built for."""

    def __init__(self, folder: Path, settings: dict, inputs: dict):
        self.folder = Path(folder)
        self.settings = settings
        self.inputs = inputs
        self.fingerprint = fingerprint(settings, inputs)
        settle(self.folder, self._beside("building"))  # a kill between the swap's two renames

    @property
    def manifest(self) -> dict | None:
        path = self.folder / _MANIFEST
        return json.loads(path.read_text()) if path.exists() else None

    @property
    def results_file(self) -> Path:
        """Where an evaluation or timing artefact keeps its results."""
        return self.folder / "results.json"

    def is_fresh(self) -> bool:
        manifest = self.manifest
        return manifest is not None and manifest.get("fingerprint") == self.fingerprint

    def start(self) -> Path:
        """The folder to build the artefact in, beside the finished one, which stays until `finish`.

        A matching unfinished attempt there is kept (to resume); any other is wiped.
        """
        building = self._beside("building")
        pending = building / _PENDING
        resumable = pending.exists() and json.loads(pending.read_text()).get("fingerprint") == self.fingerprint
        if not resumable:
            remove_path(building)
        building.mkdir(parents=True, exist_ok=True)
        pending.write_text(json.dumps({"fingerprint": self.fingerprint, "started": time.time()}))
        return building

    def finish(self, stats: dict, **extra) -> dict:
        """Write the manifest of what `start`'s folder holds, then swap it in for the previous artefact."""
        building = self._beside("building")
        manifest = {
            "id": uuid.uuid4().hex[:16],
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "inputs": self.inputs,
            "stats": stats,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra,
        }
        write_text_atomic(building / _MANIFEST, json.dumps(manifest, indent=2, default=str))
        (building / _PENDING).unlink(missing_ok=True)
        swap_in(building, self.folder)  # an adopted artefact is a link: the other run's folder stays as it is
        return manifest

    def discard(self) -> None:
        """Remove what `start` began (a process's share of a stage that another process writes)."""
        remove_path(self._beside("building"))

    def _beside(self, role: str) -> Path:
        return self.folder.with_name(f".{self.folder.name}.{role}")


class Run:
    """One run folder (`config.run_dir`): its paths, its manifests, and what its stages built, loaded once.

    `reuse` names other run folders whose up-to-date artefacts this run may adopt instead of building them.
    """

    def __init__(self, config: Config, reuse: list[Path] | tuple = ()):
        self.config = config
        self.folder = Path(config.run_dir)
        self.reuse = [Path(folder) for folder in reuse]
        self._backbone: SharedBackbone | None = None
        self._sentence_encoder = None
        self._datasets: dict[tuple, Dataset] = {}

    @classmethod
    def open(cls, folder: Path, overrides: list[str] | None = None) -> Run:
        """The run in `folder`, with the settings it was built with (its config.yaml) and `overrides`."""
        path = Path(folder) / "config.yaml"
        return cls(load_config(path if path.exists() else None, overrides, run_dir=str(folder)))

    def with_eval(self, settings: EvalConfig) -> Run:
        """The same run with other evaluation settings, sharing the loaded backbone and datasets."""
        other = Run(self.config.model_copy(update={"eval": settings}), self.reuse)
        self.backbone()  # loaded here, so that every run derived from this one shares it
        other._backbone, other._sentence_encoder, other._datasets = self._backbone, self._sentence_encoder, self._datasets
        return other

    # --- paths ----------------------------------------------------------------------------

    def stage_folder(self, stage: str) -> Path:
        return self.folder / stage

    @property
    def config_file(self) -> Path:
        return self.folder / "config.yaml"

    @property
    def negatives_file(self) -> Path:
        return self.stage_folder("mine") / "negatives.json"

    @property
    def index_folder(self) -> Path:
        return self.stage_folder("index")

    def eval_results(self, data: Path | None = None, split: str | None = None) -> Path:
        """The results file of the run's own evaluation, or of an evaluation on another dataset split."""
        if data is None and split is None:
            return self.stage_folder("eval") / "results.json"
        return self.stage_folder("eval") / f"results-{Path(data or self.config.eval.data).name}-{split or self.config.eval.split}.json"

    def system_folder(self, name: str) -> Path:
        return self.folder / "systems" / name

    def compare_folder(self, name: str) -> Path:
        return self.folder / "compare" / name

    @property
    def compare_results(self) -> Path:
        return self.folder / "compare.json"

    @property
    def report_folder(self) -> Path:
        return self.folder / "report"

    def save_config(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        text = self.config.to_yaml()
        if not (self.config_file.exists() and self.config_file.read_text() == text):  # untouched when unchanged
            write_text_atomic(self.config_file, text)

    # --- manifests ------------------------------------------------------------------------

    def artefact(self, stage: str, settings: dict, inputs: dict) -> Artefact:
        return Artefact(self.stage_folder(stage), settings, inputs)

    def process_artefact(self, stage: str, settings: dict, inputs: dict, rank: int) -> Artefact:
        """Where process `rank` (not the main one) builds its share of a training stage: RUN/.<stage>.rank<N>.building."""
        return Artefact(self.folder / f"{stage}.rank{rank}", settings, inputs)

    def adopt(self, stage: str, artefact: Artefact) -> dict | None:
        """Link `stage` to the same artefact in a `reuse` run folder, if one was built with this fingerprint."""
        for other in self.reuse:
            source = (other / stage).resolve()
            if source == artefact.folder.resolve() or not (source / _MANIFEST).exists():
                continue
            manifest = json.loads((source / _MANIFEST).read_text())
            if manifest.get("fingerprint") != artefact.fingerprint:
                continue
            folder = artefact.folder
            remove_path(folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.symlink_to(os.path.relpath(source, folder.parent), target_is_directory=True)
            log.info("%s: adopted %s", stage, source)
            return manifest
        return None

    def is_built(self, stage: str) -> bool:
        return (self.stage_folder(stage) / _MANIFEST).exists()

    def manifest(self, stage: str) -> dict:
        path = self.stage_folder(stage) / _MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"stage {stage!r} has not been run in {self.folder}; run `bsharedrag {stage}`")
        return json.loads(path.read_text())

    def ids(self, *stages: str) -> dict[str, str]:
        """stage -> the id of its finished artefact, for the inputs of what is built from them."""
        return {stage: self.manifest(stage)["id"] for stage in stages}

    def index_ids(self) -> dict:
        """What an index of this run must have been built with: the backbone and the retriever artefacts."""
        return {"backbone": self.manifest("pretrain")["id"], "adapter": self.manifest("retriever")["id"]}

    # --- inputs ---------------------------------------------------------------------------

    def data_path(self, path: Path) -> Path:
        """A dataset folder of the settings, with SYNTH standing for the synthetic dataset the run wrote."""
        return self.stage_folder("synth") / "data" if Path(path) == SYNTH else Path(path)

    def dataset(self, ref: DatasetRef) -> Dataset:
        key = (str(ref.path), ref.split, ref.max_queries)
        if key not in self._datasets:
            full = load_dataset(self.data_path(ref.path), ref.split, strict=self.config.strict_data)
            self._datasets[key] = full.sample(ref.max_queries, self.config.seed)
        return self._datasets[key]

    def dataset_inputs(self, refs: list[DatasetRef]) -> list:
        return [[str(r.path), r.split, r.max_queries, dataset_id(self.data_path(r.path), r.split)] for r in refs]

    # --- what was built -------------------------------------------------------------------

    def backbone_path(self) -> Path:
        """The trained domain backbone (`model` inside the pretrain artefact), or the base model it skipped."""
        manifest = self.manifest("pretrain")
        if "model_folder" in manifest:
            return self.stage_folder("pretrain") / manifest["model_folder"]
        return Path(manifest["path"])

    def backbone(self) -> SharedBackbone:
        """The domain backbone, loaded once; the adapters of later stages are attached to it."""
        if self._backbone is None:
            self._backbone = SharedBackbone.load(self.config.backbone, self.backbone_path())
        return self._backbone

    def release(self) -> None:
        """Forget the loaded models (the next call loads them again), so that their memory can be freed."""
        self._backbone = self._sentence_encoder = None

    def adapter(self, name: str) -> str:
        """Attach the run's adapter `name` to the backbone (once); returns the name."""
        backbone = self.backbone()
        if name not in backbone.adapters:
            backbone.load_adapter(name, self.stage_folder(name))
        return name

    @property
    def generator_adapter(self) -> str:
        """The adapter that writes answers: the retriever's own one in the fully shared architecture."""
        return RETRIEVER if self.config.architecture == "fully_shared" else GENERATOR

    @contextlib.contextmanager
    def vllm(self) -> Iterator[VllmClient]:
        """A client of the vLLM server that writes this run's answers: `vllm.url`, or one started here
        over the run's backbone with its generator adapter, and stopped when the block ends."""
        from .model.generate import stop_token_ids
        from .model.vllm import VllmClient, VllmServer

        settings, backbone = self.config.vllm, self.backbone()
        stops = stop_token_ids(backbone.tokenizer, backbone.base)
        if settings.url:
            yield VllmClient(settings.url, stops, settings.request_timeout_s)
            return
        adapter = self.generator_adapter
        adapters = {adapter: self.stage_folder(adapter)} if self.is_built(adapter) else {}
        with VllmServer(self.backbone_path(), adapters, settings) as server:
            yield VllmClient(server.url, stops, settings.request_timeout_s)

    def encoder(self):
        """What embeds questions and passages for this run's indexes (see `DenseRetriever`)."""
        if self.config.architecture == "separate":
            from .model.baselines import SentenceEncoder

            if self._sentence_encoder is None:
                self._sentence_encoder = SentenceEncoder(self.config.retriever.encoder_model)
            return self._sentence_encoder
        from .model.encoder import Encoder

        recorded = self.manifest(RETRIEVER).get("end_token")  # absent: built before the token was recorded, on EOS
        tokenizer = self.backbone().tokenizer
        end_id = tokenizer.convert_tokens_to_ids(recorded) if recorded else tokenizer.eos_token_id
        return Encoder(self.backbone(), self.config.retriever, self.adapter(RETRIEVER), end_id=end_id)

    def document_end_id(self) -> int:
        """The token that ends a document for this run's backbone: the one continual pre-training packed
        passages with (recorded by the pretrain stage; EOS for one trained before it was recorded), or the
        base model's own when pre-training was skipped."""
        from .model.prompt import document_end_id

        tokenizer = self.backbone().tokenizer
        stats = self.manifest("pretrain")["stats"]
        if "document_end" in stats:
            return tokenizer.convert_tokens_to_ids(stats["document_end"])
        return document_end_id(tokenizer, self.config.pretrain.document_end) if "skipped" in stats else tokenizer.eos_token_id

    def index_manifest(self, corpus_hash: str) -> dict:
        """What an index of this run records: the artefacts its vectors come from and how passages were embedded."""
        return {**self.index_ids(), "corpus": corpus_hash, "passage_prefix": self.config.retriever.passage_prefix,
                "max_passage_len": self.config.retriever.max_passage_len, "faiss": self.config.index.faiss_spec(),
                "end_token": self.manifest(RETRIEVER).get("end_token")}

    def index(self, corpus_dir: Path | None = None) -> VectorIndex:
        """The index of the served catalogue, or of the corpus in `corpus_dir` (built once, then cached).

        Another corpus's index lives in the retriever's artefact folder: it is derived from it alone,
        and a run that adopts the retriever adopts it too.
        """
        from .model.index import VectorIndex, build_index

        ids = self.index_ids()
        if corpus_dir is None:
            return VectorIndex.open(self.index_folder, expect=ids)
        corpus_file = Path(corpus_dir) / "corpus.jsonl"
        digest = file_hash(corpus_file)
        if self.manifest("index")["inputs"]["corpus"] == digest:
            return VectorIndex.open(self.index_folder, expect=ids)
        side = self.stage_folder("retriever") / "side-indexes" / digest
        distributed.sync()  # in a training stage over several processes: all of them see the same folder
        try:
            return VectorIndex.open(side, expect=ids)
        except (FileNotFoundError, RuntimeError):
            docs = read_corpus(corpus_file, self.config.strict_data)
            # every process of a training stage embeds its share; the main one writes the index
            build_index(self.encoder(), docs, side, self.index_manifest(digest), self.config.index.batch_tokens)
            distributed.sync()
            return VectorIndex.open(side, expect=ids)

    def retriever(self, corpus_dir: Path | None = None) -> DenseRetriever:
        """The run's dense retriever over the served catalogue, or over the corpus in `corpus_dir`."""
        from .model.encoder import DenseRetriever

        return DenseRetriever(self.encoder(), self.index(corpus_dir))

    @property
    def reranks(self) -> bool:
        """Whether the run reranks: `reranker.enabled`, and the reranker stage trained its adapter."""
        return (self.config.reranker.enabled and self.is_built(RERANKER)
                and "skipped" not in self.manifest(RERANKER)["stats"])

    def reranker(self, memo: dict | None = None) -> Reranker:
        """The run's reranker adapter as a pair scorer (`memo`: see `Reranker`)."""
        from .model.reranker import Reranker

        return Reranker(self.backbone(), self.config.reranker, self.adapter(RERANKER), memo=memo)

    def first_stage(self) -> DenseRetriever | HybridRetriever | RerankedRetriever:
        """What `search`, `ask` and the server retrieve with: the dense retriever or, with
        `index.first_stage` hybrid, the hybrid with the fusion weight recorded in the index manifest
        when the index was built; its top `reranker.depth` reranked when the run reranks."""
        from .model.hybrid import HybridRetriever, LexicalIndex
        from .model.reranker import RerankedRetriever

        first = dense = self.retriever()
        fusion = dense.index.manifest.get("fusion")
        if self.config.index.first_stage == "hybrid" and fusion is None:
            log.warning("the index at %s records no fusion weight (built before hybrid retrieval, or with "
                        "index.first_stage=dense): retrieving with the dense retriever alone; rebuild it with "
                        "`bsharedrag index --force` for hybrid retrieval", self.index_folder)
        elif self.config.index.first_stage == "hybrid":
            first = HybridRetriever(dense, LexicalIndex(dense.index), fusion["weight"], fusion["method"], chosen=fusion)
        if self.config.reranker.enabled and not self.reranks:
            log.warning("reranker.enabled is true but %s has no trained reranker: not reranking; build it with "
                        "`bsharedrag train-reranker --run %s`", self.folder, self.folder)
        return RerankedRetriever(first, self.reranker()) if self.reranks else first
