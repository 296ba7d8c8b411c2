"""Training over two CPU processes (torchrun, gloo) gives what one process gives with the same global batch."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bsharedrag import distributed
from bsharedrag.config import load_config
from bsharedrag.pipeline import run_stages
from bsharedrag.run import Run
from conftest import tiny_overrides


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_alone_every_helper_is_the_identity():
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.share_range(5) == (0, 5) and distributed.share([1, 2, 3]) == [1, 2, 3]
    rows = torch.ones(2, 3)
    assert distributed.gather_rows(rows) is rows and distributed.sum_value(1.5) == 1.5


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_train_the_adapters_as_one_process_does(tiny_model_dir, tiny_dataset, tmp_path):
    """The retriever (gradient caching, negatives gathered from both processes), the index (each process
    embeds half the corpus) and the generator, against one process with the same batches."""
    settings = [o for o in tiny_overrides(tiny_model_dir, tiny_dataset, tmp_path / "one") if not o.startswith("run_dir")]
    settings += ["retriever.batch_size=4", "retriever.micro_batch_size=2", "retriever.max_steps=3"]
    one = Run(load_config(overrides=[f"run_dir={tmp_path / 'one'}", *settings]))
    run_stages(one, ("pretrain", "mine"))
    two = tmp_path / "two"
    shutil.copytree(one.folder, two, symlinks=True)
    alone = run_stages(one, ("pretrain", "mine", "retriever", "index", "reranker", "generator"))

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "bsharedrag", "-q", "train-generator"]
    for setting in [f"run_dir={two}", *settings]:  # not --run: torchrun would take it for its --run-path
        command += ["--set", setting]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("retriever", "generator"):
        together = json.loads((two / stage / "manifest.json").read_text())
        assert together["settings"] == alone[stage]["settings"]  # (the ids of upstream artefacts differ)
        for key in ("first_loss", "final_loss"):
            assert together["stats"][key] == pytest.approx(alone[stage]["stats"][key], rel=1e-4), stage
        ours, theirs = (load_file(folder / stage / "adapter_model.safetensors") for folder in (two, one.folder))
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], atol=2e-5, rtol=1e-4)
    assert not [p.name for p in two.iterdir() if ".rank" in p.name]  # the other process's shares left nothing
    sharded, whole = _stored(two / "index"), _stored(one.folder / "index")
    assert list(sharded) == list(whole) and len(sharded) > 2
    torch.testing.assert_close(torch.stack(list(sharded.values())), torch.stack(list(whole.values())),
                               atol=1e-3, rtol=1e-3)  # the adapters agree within 2e-5, so their vectors nearly


def _stored(index_folder) -> dict:
    """doc id -> vector, in the order the index store holds them."""
    import sqlite3

    import numpy as np

    with sqlite3.connect(index_folder / "docs.sqlite") as connection:
        rows = connection.execute("SELECT doc_id, vector FROM docs ORDER BY rowid").fetchall()
    return {doc_id: torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy()) for doc_id, blob in rows}
