import csv
import json

import pytest
from tiny import TOKENIZER_DIR, tiny_tokenizer
from typer.testing import CliRunner

from bsharedrag import cli
from bsharedrag.catalogue import FieldMap, chunk_text, import_catalogue
from bsharedrag.config import CatalogueConfig
from bsharedrag.data import DataError, read_corpus

LONG = " ".join(f"spec{i} is {i} mm." for i in range(120))


def _tokens(text: str) -> int:
    return len(tiny_tokenizer()(text, add_special_tokens=False)["input_ids"])


def test_chunks_are_bounded_overlap_and_cover_the_text():
    chunks = chunk_text(LONG, tiny_tokenizer(), chunk_tokens=50, overlap_tokens=10)
    assert len(chunks) > 5 and all(_tokens(chunk) <= 50 for chunk in chunks)
    for before, after in zip(chunks, chunks[1:]):
        shared = before[-15:]
        assert shared.split()[-1] in after[:80]  # the next chunk starts inside the previous one's end
    assert chunks[0].startswith("spec0 is") and chunks[-1].endswith("spec119 is 119 mm.")
    assert chunk_text("short text", tiny_tokenizer(), 50, 10) == ["short text"]


def test_chinese_text_is_chunked_by_tokens_too():
    text = "这款背包采用防泼水面料，但不完全防水。" * 20
    chunks = chunk_text(text, tiny_tokenizer(), chunk_tokens=40, overlap_tokens=8)
    assert len(chunks) > 2 and all(_tokens(chunk) <= 40 for chunk in chunks) and chunks[0].startswith("这款背包")


def test_the_field_mapping_joins_text_fields_and_keeps_the_product_id():
    fields = FieldMap.parse(["id=sku", "title=name", "text=description,specs"])
    assert fields.document_parts({"sku": 7, "name": "Kettle", "description": "Boils fast.", "specs": "1.7 L",
                                  "price": 20}) == ("7", "Kettle", "Boils fast.\n1.7 L")
    with pytest.raises(ValueError, match="id=FIELD"):
        FieldMap.parse(["colour=red"])
    with pytest.raises(ValueError, match="none of the text fields"):
        fields.document_parts({"sku": 1, "name": "x", "description": "", "specs": None})


def test_import_writes_passages_with_title_and_product_and_reports_bad_records(tmp_path):
    source = tmp_path / "products.jsonl"
    source.write_text("\n".join([
        json.dumps({"sku": "A1", "name": "Trail backpack", "body": LONG}),
        "{broken json",
        json.dumps({"name": "no id", "body": "text"}),
        json.dumps({"sku": "B2", "name": "保温杯", "body": "不锈钢内胆，保温12小时。"}, ensure_ascii=False),
    ]) + "\n")
    manifest = import_catalogue(source, tmp_path / "corpus", FieldMap.parse(["id=sku", "title=name", "text=body"]),
                                tiny_tokenizer(), CatalogueConfig(chunk_tokens=60, overlap_tokens=10))
    docs = read_corpus(tmp_path / "corpus" / "corpus.jsonl")
    a1 = [doc for doc in docs if doc.product_id == "A1"]
    assert len(a1) > 3 and {doc.title for doc in a1} == {"Trail backpack"} and a1[0].id == "A1-p0"
    assert [doc.text for doc in docs if doc.product_id == "B2"] == ["不锈钢内胆，保温12小时。"]
    assert [line.split(":")[1] for line in manifest["skipped_records"]] == ["2", "3"]  # file:line: why
    assert manifest["products"] == 2 and manifest["passages"] == len(docs)
    assert json.loads((tmp_path / "corpus" / "manifest.json").read_text())["source_hash"] == manifest["source_hash"]
    with pytest.raises(DataError, match=r"products.jsonl:2: malformed"):
        import_catalogue(source, tmp_path / "strict", FieldMap.parse(["id=sku", "title=name", "text=body"]),
                         tiny_tokenizer(), CatalogueConfig(), strict=True)
    assert not (tmp_path / "strict").exists()


def test_duplicate_ids_are_refused_by_name_and_leave_the_old_corpus(tmp_path):
    source = tmp_path / "products.csv"
    with source.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["id", "title", "text"], ["K1", "Kettle", "boils"], ["K2", "Cup", "holds"],
                          ["K1", "Kettle again", "boils twice"]])
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "corpus.jsonl").write_text('{"_id": "old", "text": "kept"}\n')
    with pytest.raises(DataError, match="duplicate product ids K1;"):
        import_catalogue(source, out, FieldMap(), tiny_tokenizer(), CatalogueConfig())
    assert (out / "corpus.jsonl").read_text() == '{"_id": "old", "text": "kept"}\n'


def test_parquet_records_are_read(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    source = tmp_path / "products.parquet"
    parquet.write_table(pyarrow.table({"id": ["P1", "P2"], "title": ["Lamp", "Desk"], "text": ["warm light", None]}),
                        source)
    manifest = import_catalogue(source, tmp_path / "corpus", FieldMap(), tiny_tokenizer(), CatalogueConfig())
    assert manifest["products"] == 1 and len(manifest["skipped_records"]) == 1  # P2 has no text


def test_the_import_command(tmp_path):
    source = tmp_path / "products.jsonl"
    source.write_text(json.dumps({"sku": "A1", "name": "Lamp", "desc": "warm light"}) + "\n")
    result = CliRunner().invoke(cli.app, ["catalogue", "import", str(source), "--out", str(tmp_path / "corpus"),
                                          "--field", "id=sku", "--field", "title=name", "--field", "text=desc",
                                          "--tokenizer", str(TOKENIZER_DIR)])
    assert result.exit_code == 0, result.output
    assert "1 products -> 1 passages" in result.stdout
    missing = CliRunner().invoke(cli.app, ["catalogue", "import", str(tmp_path / "nope.jsonl"), "--out",
                                           str(tmp_path / "x"), "--tokenizer", str(TOKENIZER_DIR)])
    assert missing.exit_code == 1 and "does not exist" in missing.output
