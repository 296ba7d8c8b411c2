"""The `bsharedrag` command: each command parses its arguments and calls the library."""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from typing import Annotated

import click
import typer

from .pipeline import STAGES, refuse_unbuilt_settings, run_stages, stage_names

app = typer.Typer(help="Backbone-shared RAG: one language model, a retriever adapter and a generator adapter.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a setting: section.key=value.")]
RunOption = Annotated[Path | None, typer.Option("--run", "--run-dir", help="Run folder (default: config's run_dir).")]
ForceOption = Annotated[bool, typer.Option(
    "--force", help="Rebuild the named stage even when it is up to date (stages built from it follow).")]
UpstreamOption = Annotated[bool, typer.Option(
    "--force-upstream", help="Rebuild the stages before the named one too, even when they are up to date.")]


def _setup_logging(level: int = logging.INFO) -> None:
    """Logs to standard error (results alone go to standard output): ours at `level`, other libraries' at WARNING."""
    import sys
    import warnings

    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True,
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])
    logging.getLogger("bsharedrag").setLevel(level)
    logging.captureWarnings(True)
    quiet_libraries = level > logging.DEBUG  # their deprecation notices and weight-loading bars are for their developers
    if quiet_libraries:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    # transformers reads these when it is imported (importing it here would cost every command 2 s)
    os.environ["TRANSFORMERS_VERBOSITY"] = logging.getLevelName(max(level, logging.WARNING)).lower()
    if quiet_libraries:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:  # already imported (a notebook, a test): tell it directly
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity(max(level, logging.WARNING))
        if quiet_libraries:
            transformers_logging.disable_progress_bar()


@app.callback()
def _options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debugging detail.")] = False,
             quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log warnings and errors only.")] = False):
    if verbose and quiet:
        raise typer.BadParameter("--verbose and --quiet exclude each other")
    if quiet:
        os.environ["BSHAREDRAG_NO_PROGRESS"] = "1"
    _setup_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def _run(config: Path | None, overrides: list[str] | None, run: Path | None = None):
    """The run that the options name: a run folder remembers the settings it was made with."""
    from .config import load_config
    from .run import Run

    if config is None and run is not None:
        return Run.open(run, overrides)
    return Run(load_config(config, overrides, **({"run_dir": str(run)} if run is not None else {})))


def _built_run(config: Path | None, overrides: list[str] | None, run: Path | None = None):
    """The run the options name, for a command that reads what was built: settings it cannot apply are refused."""
    opened = _run(config, overrides, run)
    if run is not None and not Path(run).is_dir():
        raise FileNotFoundError(f"no run folder {run}; build one with `bsharedrag run --run {run}`")
    if overrides or config is not None:
        refuse_unbuilt_settings(opened, _run(None, None, opened.folder))
    return opened


_USER_ERRORS = (FileNotFoundError, ValueError, KeyError, RuntimeError)


def _reports_errors(command):
    """A command whose expected failures (bad input, missing artefacts) end in one `error:` line, not a traceback."""

    @functools.wraps(command)
    def reporting(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except click.exceptions.Exit:
            raise  # typer's own exit (a RuntimeError too)
        except _USER_ERRORS as error:
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None

    return reporting


def _build(stages: tuple[str, ...], config, overrides, run, rebuild: tuple[str, ...] = ()):
    """Build `stages` of the run the options name, print each stage's statistics; returns the run."""
    from rich.console import Console
    from rich.table import Table

    built = _run(config, overrides, run)
    table = Table("stage", "folder", "statistics", title="stages")
    for stage, manifest in run_stages(built, stages, rebuild).items():
        stats = manifest.get("stats", {})
        table.add_row(stage, str(built.stage_folder(stage)), ", ".join(f"{k} {_number(v)}" for k, v in stats.items()))
    Console().print(table)
    return built


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command()
@_reports_errors
def run(config: ConfigOption = None, set_: SetOption = None, run: RunOption = None,
        force: Annotated[bool, typer.Option("--force", help="Rebuild every stage, even those up to date.")] = False):
    """Run every stage in order: pretrain, synth, mine, train-retriever, index, train-reranker, train-generator, eval."""
    _print_tables(_build(stage_names(), config, set_, run, stage_names() if force else ()).eval_results())


def _stage_command(position: int):
    """The command of the stage at `position` of the stage table: it builds that stage and any before it."""
    stage = STAGES[position]

    @_reports_errors
    def build(config: ConfigOption = None, set_: SetOption = None, run: RunOption = None, force: ForceOption = False,
              force_upstream: UpstreamOption = False):
        stages = stage_names()[: position + 1]
        _build(stages, config, set_, run, (stages if force_upstream else stages[-1:] if force else ()))

    build.__doc__ = stage.summary
    return build


for _position, _stage in enumerate(STAGES):
    if _stage.name not in ("eval", "synth"):  # `eval` and `synth` below take any data; `run` builds both stages
        app.command(_stage.command or _stage.name)(_stage_command(_position))


@app.command()
@_reports_errors
def search(question: str, top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, max=100)] = 5,
           product_id: Annotated[str | None, typer.Option(help="Only this product's passages.")] = None,
           run: RunOption = None, config: ConfigOption = None, set_: SetOption = None):
    """Print the top-k passages for a question, with scores."""
    from rich.console import Console
    from rich.table import Table

    from .rag import load_rag

    rag = load_rag(_built_run(config, set_, run), with_generator=False)
    hits = rag.search(question, top_k=top_k, product_id=product_id)
    table = Table("rank", "score", "id", "product", "passage")
    for rank, hit in enumerate(hits, 1):
        table.add_row(str(rank), f"{hit.score:.4f}", hit.doc.id, hit.doc.product_id or "", shorten(hit.doc.content))
    Console().print(table)


_BREAK = re.compile(r"[\s。；，！？;,.!?]")


def shorten(text: str, limit: int = 400) -> str:
    """`text` cut to about `limit` characters at a word or clause boundary (Chinese has no spaces), marked with …"""
    if len(text) <= limit:
        return text
    breaks = [m.end() for m in _BREAK.finditer(text, 0, limit + 1)]
    end = breaks[-1] if breaks and breaks[-1] > limit // 2 else limit
    return text[:end].rstrip() + " …"


@app.command()
@_reports_errors
def ask(question: str, top_k: Annotated[int | None, typer.Option("--top-k", "-k", min=1, max=100)] = None,
        product_id: Annotated[str | None, typer.Option(help="Only this product's passages.")] = None,
        max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer in tokens.")] = 128,
        run: RunOption = None, config: ConfigOption = None, set_: SetOption = None):
    """Answer a question from retrieved passages, streamed, with the cited passages listed."""
    from .rag import Answer, load_rag

    rag = load_rag(_built_run(config, set_, run))
    answer = None
    for chunk in rag.stream(question, top_k=top_k, product_id=product_id, max_new_tokens=max_new_tokens):
        if isinstance(chunk, Answer):
            answer = chunk
        elif isinstance(chunk, str):
            typer.echo(chunk, nl=False)
    typer.echo("\n")
    if not answer.passages:
        return
    cited = {c.doc_id for c in answer.citations}
    typer.echo("passages (* cited in the answer):")
    for number, hit in enumerate(answer.passages, 1):
        mark = "*" if hit.doc.id in cited else " "
        product = f"  product {hit.doc.product_id}" if hit.doc.product_id else ""
        typer.echo(f"{mark}[{number}] {hit.doc.id}{product}\n     {shorten(hit.doc.content)}")


@app.command("eval")
@_reports_errors
def eval_(run: RunOption = None,
          data: Annotated[Path | None, typer.Option(help="BEIR-style dataset folder (default: config's eval.data).")] = None,
          split: Annotated[str | None, typer.Option(help="qrels split (default: config's eval.split).")] = None,
          output: Annotated[Path | None, typer.Option(help="Where to write the results JSON.")] = None,
          config: ConfigOption = None, set_: SetOption = None):
    """Evaluate retrieval (and generation) of the run and the baselines on a dataset split."""
    from .evaluate import evaluate

    evaluated = _built_run(config, set_, run)
    settings = evaluated.config.eval
    output = output or evaluated.eval_results(data or settings.data, split or settings.split)
    evaluate(evaluated, data or settings.data, split or settings.split, output)
    _print_tables(output)


@app.command("compare")
@_reports_errors
def compare_(config: ConfigOption = None, set_: SetOption = None, run: RunOption = None,
             report: Annotated[bool, typer.Option(help="Also write RUN/report/report.md.")] = True):
    """Train what is missing and evaluate every system of `compare.systems` on the same splits."""
    import shlex
    import sys

    from .compare import compare
    from .report import write_report

    compared = _run(config, set_, run)
    results = compare(compared.config, command=" ".join(["bsharedrag", *map(shlex.quote, sys.argv[1:])]))
    if report:
        typer.echo(f"report: {write_report(results, compared.report_folder)}")


@app.command("report")
@_reports_errors
def report_(run: Annotated[Path, typer.Argument(help="A run folder that `bsharedrag compare` wrote.")],
            output: Annotated[Path | None, typer.Option(help="Report folder (default: RUN/report).")] = None):
    """Write a Markdown report with tables and PNG plots from RUN/compare.json."""
    from .report import load_results, write_report
    from .run import Run

    if not Path(run).is_dir():
        raise FileNotFoundError(f"no run folder {run}; `bsharedrag compare --run {run}` builds one "
                                "(the committed report of the quick comparison is docs/compare/report.md)")
    compared = Run.open(run)
    if not compared.compare_results.exists():
        raise FileNotFoundError(f"{run} holds no comparison ({compared.compare_results} is missing); "
                                f"`bsharedrag compare --run {run}` writes it")
    path = write_report(load_results(compared.compare_results), output or compared.report_folder)
    typer.echo(f"report: {path}")


def _print_tables(results_path: Path) -> None:
    import json

    from .metrics import markdown_table

    if not results_path.exists():
        return
    results = json.loads(results_path.read_text())
    counts = {"retrieval": results["queries"], "generation": results.get("generation_queries")}
    for section in ("retrieval", "generation"):
        if results.get(section):
            typer.echo(f"\n{section} ({results['data']}, split {results['split']}, {counts[section]} queries; "
                       "95% bootstrap intervals over the queries in brackets)\n")
            typer.echo(markdown_table(results[section], intervals=results.get("intervals", {}).get(section)))
    if results.get("search_ms_per_query"):
        typer.echo("\nsearch time per query (ms): " + ", ".join(f"{system} {ms}" for system, ms in
                                                              results["search_ms_per_query"].items()))
    if results.get("faithfulness"):
        typer.echo("\nfaithfulness (bsharedrag): " + ", ".join(f"{k} {_number(v)}" for k, v in results["faithfulness"].items()))
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
@_reports_errors
def serve(run: RunOption = None, host: HostOption = None, port: PortOption = None,
          config: ConfigOption = None, set_: SetOption = None):
    """Serve a finished run over HTTP: search, answers, OpenAI-compatible API, catalogue updates, web page."""
    from .serving import serve as serve_run

    serve_run(_built_run(config, set_, run), host, port)


catalogue_app = typer.Typer(help="A shop's own catalogue: product records in, a corpus of passages out.",
                            no_args_is_help=True)
app.add_typer(catalogue_app, name="catalogue")


@catalogue_app.command("import")
@_reports_errors
def catalogue_import(
    file: Annotated[Path, typer.Argument(help="Product records: .jsonl, .csv or .parquet.")],
    out: Annotated[Path, typer.Option("--out", help="The corpus folder to write (corpus.jsonl, manifest.json).")],
    field: Annotated[list[str] | None, typer.Option(
        "--field", help="Which record field holds what: id=sku, title=name, text=description,specs.")] = None,
    strict: Annotated[bool, typer.Option(help="A malformed record is an error, not skipped.")] = False,
    tokenizer: Annotated[str | None, typer.Option(
        help="Tokenizer that counts the passage tokens (default: the config's backbone).")] = None,
    config: ConfigOption = None, set_: SetOption = None,
):
    """Split product records into passages (title on each, product id kept) and write a BEIR-style corpus."""
    from transformers import AutoTokenizer

    from .catalogue import FieldMap, import_catalogue
    from .config import load_config
    from .model.backbone import resolve_model_source

    settings = load_config(config, set_)
    fields = FieldMap.parse(field)
    source = tokenizer if tokenizer is not None else resolve_model_source(settings.backbone)
    manifest = import_catalogue(file, out, fields, AutoTokenizer.from_pretrained(source), settings.catalogue, strict)
    typer.echo(f"{manifest['products']} products -> {manifest['passages']} passages in {out}/corpus.jsonl"
               + (f"; {len(manifest['skipped_records'])} records skipped (listed in {out}/manifest.json)"
                  if manifest["skipped_records"] else ""))


@app.command()
@_reports_errors
def synth(corpus: Annotated[Path, typer.Option(help="A corpus folder (corpus.jsonl), e.g. from `catalogue import`.")],
          out: Annotated[Path, typer.Option(help="The dataset folder to write (queries, qrels/train.tsv, qrels/dev.tsv).")],
          config: ConfigOption = None, set_: SetOption = None):
    """Write synthetic shopper questions and answers for a corpus's passages (resumes when killed)."""
    from .config import load_config
    from .model.backbone import resolve_model_source
    from .synth import synthesise

    settings = load_config(config, set_)
    source = None
    if not settings.synth.endpoint:
        source = settings.synth.writer or resolve_model_source(settings.backbone)
    manifest = synthesise(corpus, out, settings.synth, settings.seed, model_source=source)
    kept, filters = manifest["queries"], manifest["filters"]
    typer.echo(f"{kept['train']} train and {kept['dev']} dev questions in {out}; filters: "
               + ", ".join(f"{name} {count}" for name, count in filters.items()))


docs_app = typer.Typer(help="Update a run's catalogue (its index) without rebuilding it.", no_args_is_help=True)
app.add_typer(docs_app, name="docs")


@docs_app.command("add")
@_reports_errors
def docs_add(file: Annotated[Path, typer.Argument(help="A corpus.jsonl file: _id, title, text, product_id, ...")],
             run: RunOption = None, config: ConfigOption = None, set_: SetOption = None):
    """Insert or replace the documents of a JSONL file, embedded with the retriever adapter (all or none)."""
    from .serving import read_documents, serving_lock, upsert_documents

    catalogue = _built_run(config, set_, run)
    docs = read_documents(file)
    with serving_lock(catalogue.index_folder, holder="`bsharedrag docs add`"):
        retriever = catalogue.retriever()  # the encoder and the index; no generator
        count = upsert_documents(retriever, docs, catalogue.config.index.batch_tokens)
        retriever.index.save()
    typer.echo(f"upserted {count} documents; the index holds {len(retriever.index)}")


@docs_app.command("rm")
@_reports_errors
def docs_rm(ids: Annotated[list[str] | None, typer.Argument(help="Ids of the documents to remove.")] = None,
            ids_file: Annotated[Path | None, typer.Option(
                "--ids-file", help="Also remove the ids listed in this file, one per line (`-`: standard input).")] = None,
            run: RunOption = None, config: ConfigOption = None, set_: SetOption = None):
    """Remove documents by id (one transaction)."""
    from .model.index import VectorIndex
    from .serving import delete_documents, read_document_ids, serving_lock

    ids = list(ids or []) + (read_document_ids(ids_file) if ids_file is not None else [])
    if not ids:
        raise ValueError("name the ids to remove as arguments or in a file with --ids-file")
    folder = _built_run(config, set_, run).index_folder
    with serving_lock(folder, holder="`bsharedrag docs rm`"):
        index = VectorIndex.open(folder)
        missing = delete_documents(index, ids)
        index.save()
    if set(missing) == set(ids):
        raise ValueError(f"none of the ids is in the index ({', '.join(missing)}); nothing was removed")
    if missing:
        typer.secho(f"not in the index: {', '.join(missing)}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"removed {len(set(ids) - set(missing))} documents; the index holds {len(index)}")
