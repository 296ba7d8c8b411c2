"""The `bsharedrag` command: each command parses its arguments and calls the library."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Backbone-shared RAG: one language model, a retriever adapter and a generator adapter.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a setting: section.key=value.")]
RunOption = Annotated[Path | None, typer.Option("--run", "--run-dir", help="Run folder (default: config's run_dir).")]
ForceOption = Annotated[bool, typer.Option("--force", help="Rebuild even when the artefact is up to date.")]


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False)], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "jieba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config(config: Path | None, overrides: list[str] | None, run: Path | None = None):
    from .config import load_config

    layered_file = config
    if config is None and run is not None and (run / "config.yaml").exists():
        layered_file = run / "config.yaml"  # a run folder remembers the settings it was made with
    fields = {"run_dir": str(run)} if run is not None else {}
    return load_config(layered_file, overrides, **fields)


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _stages(stages: tuple[str, ...], config, overrides, run, force) -> None:
    from .pipeline import Pipeline

    _setup_logging()
    try:
        pipeline = Pipeline(_config(config, overrides, run))
        for stage, manifest in pipeline.run(stages, force).items():
            typer.echo(f"{stage}: {pipeline.folder(stage)} {manifest.get('stats', {})}")
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        _fail(error)


@app.command()
def run(config: ConfigOption = None, set_: SetOption = None, run: RunOption = None, force: ForceOption = False):
    """Run every stage in order: pretrain, mine, train-retriever, index, train-generator, eval."""
    from .pipeline import STAGES

    _stages(STAGES, config, set_, run, force)
    _print_tables(_config(config, set_, run).run_dir / "eval" / "results.json")


@app.command()
def pretrain(config: ConfigOption = None, set_: SetOption = None, run: RunOption = None, force: ForceOption = False):
    """Stage 1: continual pre-training of the backbone on the domain corpus."""
    _stages(("pretrain",), config, set_, run, force)


@app.command()
def mine(config: ConfigOption = None, set_: SetOption = None, run: RunOption = None, force: ForceOption = False):
    """Stage 2: mine hard negatives for the retriever's training queries."""
    _stages(("pretrain", "mine"), config, set_, run, force)


@app.command("train-retriever")
def train_retriever(config: ConfigOption = None, set_: SetOption = None, run: RunOption = None,
                    force: ForceOption = False):
    """Stage 3: train the retriever adapter (InfoNCE with in-batch and hard negatives)."""
    _stages(("pretrain", "mine", "retriever"), config, set_, run, force)


@app.command()
def index(config: ConfigOption = None, set_: SetOption = None, run: RunOption = None, force: ForceOption = False):
    """Embed the corpus with the retriever adapter into the run's FAISS index."""
    _stages(("pretrain", "mine", "retriever", "index"), config, set_, run, force)


@app.command("train-generator")
def train_generator(config: ConfigOption = None, set_: SetOption = None, run: RunOption = None,
                    force: ForceOption = False):
    """Stage 4: train the generator adapter on retrieved passages (loss on answer tokens only)."""
    _stages(("pretrain", "mine", "retriever", "index", "generator"), config, set_, run, force)


@app.command()
def search(question: str, top_k: Annotated[int, typer.Option("--top-k", "-k")] = 5,
           product_id: Annotated[str | None, typer.Option(help="Only this product's passages.")] = None,
           run: RunOption = None, config: ConfigOption = None, set_: SetOption = None):
    """Print the top-k passages for a question, with scores."""
    from rich.console import Console
    from rich.table import Table

    from .rag import load_rag

    try:
        rag = load_rag(_config(config, set_, run), with_generator=False)
        hits = rag.search(question, top_k=top_k, product_id=product_id)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        _fail(error)
    table = Table("rank", "score", "id", "passage")
    for rank, hit in enumerate(hits, 1):
        table.add_row(str(rank), f"{hit.score:.4f}", hit.doc.id, hit.doc.content[:200])
    Console().print(table)


@app.command()
def ask(question: str, top_k: Annotated[int | None, typer.Option("--top-k", "-k")] = None,
        product_id: Annotated[str | None, typer.Option(help="Only this product's passages.")] = None,
        max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 128,
        run: RunOption = None, config: ConfigOption = None, set_: SetOption = None):
    """Answer a question from retrieved passages, streamed, with the cited passages listed."""
    from .rag import Answer, load_rag

    try:
        rag = load_rag(_config(config, set_, run))
        answer = None
        for chunk in rag.stream(question, top_k=top_k, product_id=product_id, max_new_tokens=max_new_tokens):
            if isinstance(chunk, Answer):
                answer = chunk
            else:
                typer.echo(chunk, nl=False)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        _fail(error)
    typer.echo("\n")
    cited = {c.doc_id for c in answer.citations}
    for number, hit in enumerate(answer.passages, 1):
        mark = "*" if hit.doc.id in cited else " "
        typer.echo(f"{mark}[{number}] {hit.doc.id}  {hit.doc.content[:160]}")


@app.command("eval")
def eval_(run: RunOption = None,
          data: Annotated[Path | None, typer.Option(help="BEIR-style dataset folder (default: config's eval.data).")] = None,
          split: Annotated[str | None, typer.Option(help="qrels split (default: config's eval.split).")] = None,
          output: Annotated[Path | None, typer.Option(help="Where to write the results JSON.")] = None,
          config: ConfigOption = None, set_: SetOption = None):
    """Evaluate retrieval (and generation) of the run and the baselines on a dataset split."""
    from .evaluate import evaluate
    from .pipeline import Pipeline

    _setup_logging()
    try:
        cfg = _config(config, set_, run)
        output = output or cfg.run_dir / "eval" / f"results-{(data or cfg.eval.data).name}-{split or cfg.eval.split}.json"
        evaluate(Pipeline(cfg), data or cfg.eval.data, split or cfg.eval.split, output)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        _fail(error)
    _print_tables(output)


@app.command("compare")
def compare_(config: ConfigOption = None, set_: SetOption = None, run: RunOption = None,
             report: Annotated[bool, typer.Option(help="Also write RUN/report/report.md.")] = True):
    """Train what is missing and evaluate every system of `compare.systems` on the same splits."""
    import shlex
    import sys

    from .compare import compare
    from .report import write_report

    _setup_logging()
    try:
        cfg = _config(config, set_, run)
        results = compare(cfg, command=" ".join(["bsharedrag", *map(shlex.quote, sys.argv[1:])]))
        if report:
            typer.echo(f"report: {write_report(results, Path(cfg.run_dir) / 'report')}")
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        _fail(error)


@app.command("report")
def report_(run: Annotated[Path, typer.Argument(help="A run folder that `bsharedrag compare` wrote.")],
            output: Annotated[Path | None, typer.Option(help="Report folder (default: RUN/report).")] = None):
    """Write a Markdown report with tables and PNG plots from RUN/compare.json."""
    from .report import load_results, write_report

    try:
        path = write_report(load_results(run / "compare.json"), output or run / "report")
    except (FileNotFoundError, ValueError) as error:
        _fail(error)
    typer.echo(f"report: {path}")


def _print_tables(results_path: Path) -> None:
    import json

    from .metrics import markdown_table

    if not results_path.exists():
        return
    results = json.loads(results_path.read_text())
    for section in ("retrieval", "generation"):
        if results.get(section):
            typer.echo(f"\n{section} ({results['data']}, split {results['split']}, {results['queries']} queries)\n")
            typer.echo(markdown_table(results[section]))
    losses = results.get("data_losses") or {}
    if losses.get("skipped_lines") or losses.get("dropped_judgements"):
        typer.secho(f"\nwarning: reading {results['data']} skipped {len(losses['skipped_lines'])} malformed line(s) "
                    f"and dropped {losses['dropped_judgements']} judgement(s) of passages missing from the corpus "
                    f"({losses['dropped_queries']} queries lost all of theirs); listed under `data_losses` in "
                    f"{results_path}", fg=typer.colors.YELLOW, err=True)


def main() -> None:  # pragma: no cover
    app()


# --- serving -------------------------------------------------------------------------------

HostOption = Annotated[str | None, typer.Option(help="Interface to listen on (default: config's serve.host).")]
PortOption = Annotated[int | None, typer.Option(help="Port to listen on (default: config's serve.port).")]


@app.command()
def serve(run: RunOption = None, host: HostOption = None, port: PortOption = None,
          config: ConfigOption = None, set_: SetOption = None):
    """Serve a finished run over HTTP: search, answers, OpenAI-compatible API, catalogue updates, web page."""
    from .serving import serve as serve_run

    _setup_logging()
    try:
        serve_run(_config(config, set_, run), host, port)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        _fail(error)


docs_app = typer.Typer(help="Update a run's catalogue (its index) without rebuilding it.", no_args_is_help=True)
app.add_typer(docs_app, name="docs")


@docs_app.command("add")
def docs_add(file: Annotated[Path, typer.Argument(help="A corpus.jsonl file: _id, title, text, product_id, ...")],
             run: RunOption = None, config: ConfigOption = None, set_: SetOption = None):
    """Insert or replace the documents of a JSONL file, embedded with the retriever adapter (all or none)."""
    from .rag import load_rag
    from .serving import read_documents, serving_lock, upsert_documents

    try:
        cfg = _config(config, set_, run)
        docs = read_documents(file)
        with serving_lock(Path(cfg.run_dir) / "index", holder="`bsharedrag docs add`"):
            rag = load_rag(cfg, with_generator=False)
            count = upsert_documents(rag, docs, cfg.index.batch_tokens)
            rag.retriever.index.save()
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        _fail(error)
    typer.echo(f"upserted {count} documents; the index holds {len(rag.retriever.index)}")


@docs_app.command("rm")
def docs_rm(ids: Annotated[list[str] | None, typer.Argument(help="Ids of the documents to remove.")] = None,
            ids_file: Annotated[Path | None, typer.Option(
                "--ids-file", help="Also remove the ids listed in this file, one per line (`-`: standard input).")] = None,
            run: RunOption = None, config: ConfigOption = None, set_: SetOption = None):
    """Remove documents by id (one transaction)."""
    from .index import VectorIndex
    from .serving import delete_documents, read_document_ids, serving_lock

    try:
        ids = list(ids or []) + (read_document_ids(ids_file) if ids_file is not None else [])
        if not ids:
            raise ValueError("name the ids to remove as arguments or in a file with --ids-file")
        folder = Path(_config(config, set_, run).run_dir) / "index"
        with serving_lock(folder, holder="`bsharedrag docs rm`"):
            index = VectorIndex.open(folder)
            missing = delete_documents(index, ids)
            index.save()
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        _fail(error)
    if missing:
        typer.secho(f"not in the index: {', '.join(missing)}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"removed {len(set(ids) - set(missing))} documents; the index holds {len(index)}")
