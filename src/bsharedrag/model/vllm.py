"""Answers from vLLM: a client of its OpenAI-compatible server, and starting that server for a run.

vLLM runs one task per engine (vllm-project/vllm#9702), so with `engine: vllm` only the answers
move there: the generator adapter is served as a LoRA model of the same name (`--lora-modules`), the
bare backbone as `backbone` (the zero-shot baseline). Embeddings, searches and reranking stay on the
shared backbone in this process, which therefore holds the base weights a second time (vLLM holds
the other copy, with its paged KV cache); docs/scale.md measures that trade-off.

Prompts travel as token ids built by `model.prompt`, so vLLM answers the very prompt the native
engine would, and stop at the same end-of-turn and EOS ids. `VllmClient.url` may name a server
started elsewhere (a GPU machine, `vllm serve` with tensor parallelism); `VllmServer` starts one on
this machine from the Python of the optional vLLM environment (`scripts/install_vllm.sh`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import VllmConfig

__all__ = ["BACKBONE_MODEL", "VllmClient", "VllmError", "VllmServer", "lora_rank_bound", "vllm_python_default"]

log = logging.getLogger(__name__)

BACKBONE_MODEL = "backbone"  # the served name of the bare backbone (the zero-shot answers)
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank


class VllmError(RuntimeError):
    """vLLM could not be started, or answered a request with an error."""


def lora_rank_bound(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds an adapter of rank `rank`."""
    for bound in _LORA_RANKS:
        if bound >= rank:
            return bound
    raise VllmError(f"vLLM serves LoRA ranks up to {_LORA_RANKS[-1]}, the adapter has rank {rank}")


class VllmClient:
    """Streams answers to token-id prompts from a vLLM server's `/v1/completions`.

    `model` is the adapter name (served as a LoRA of that name) or None for the bare backbone.
    """

    def __init__(self, url: str, stop_ids: set[int] | list[int], timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        self.stop_ids = sorted(stop_ids)
        self.timeout_s = timeout_s

    def _body(self, prompt_ids: list[int], max_new_tokens: int, adapter: str | None, temperature: float,
              top_p: float, seed: int | None) -> dict:
        if not prompt_ids:
            raise ValueError("`prompt_ids` is empty; build the prompt with bsharedrag.model.prompt.encode_prompt")
        if max_new_tokens <= 0:
            raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens}")
        body = {"model": adapter or BACKBONE_MODEL, "prompt": list(prompt_ids), "max_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "stream": True,
                "stop_token_ids": self.stop_ids, "skip_special_tokens": True}
        return body if seed is None else {**body, "seed": seed}

    @staticmethod
    def _chunk(line: str) -> str | None:
        """The text of one server-sent event line ('' for a line without text), None at the end."""
        if not line.startswith("data:"):
            return ""
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return None
        event = json.loads(data)
        if "error" in event:
            raise VllmError(f"vLLM: {event['error']}")
        return "".join(choice.get("text", "") for choice in event.get("choices", []))

    @staticmethod
    def _check(status: int, body: bytes) -> None:
        if status != 200:
            raise VllmError(f"vLLM answered {status}: {body.decode(errors='replace')[:500]}")

    def stream(self, prompt_ids: list[int], max_new_tokens: int, adapter: str | None = "generator", *,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
        """Text chunks of the answer as vLLM writes them (as `model.generate.stream_tokens`, remotely):
        `astream` driven by an event loop of this call's own, so any thread may call it."""
        loop = asyncio.new_event_loop()
        chunks = self.astream(prompt_ids, max_new_tokens, adapter, temperature=temperature, top_p=top_p, seed=seed)
        try:
            while True:
                try:
                    yield loop.run_until_complete(anext(chunks))
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(chunks.aclose())
            loop.close()

    async def astream(self, prompt_ids: list[int], max_new_tokens: int, adapter: str | None = "generator", *,
                      temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> AsyncIterator[str]:
        """Text chunks of the answer as vLLM writes them; waiting on vLLM blocks no thread."""
        import httpx

        body = self._body(prompt_ids, max_new_tokens, adapter, temperature, top_p, seed)
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client, \
                    client.stream("POST", f"{self.url}/v1/completions", json=body) as response:
                self._check(response.status_code, await response.aread() if response.status_code != 200 else b"")
                async for line in response.aiter_lines():
                    chunk = self._chunk(line)
                    if chunk is None:
                        return
                    if chunk:
                        yield chunk
        except httpx.HTTPError as error:
            raise VllmError(f"vLLM at {self.url} did not answer: {error!r}") from error

    def ready(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False


def _end_with_parent() -> None:
    """In the child before it runs vLLM: Linux sends it SIGTERM if this process dies first (even killed -9),
    so a crashed server leaves no vLLM behind holding memory and its port."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop() still ends it on a clean exit


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class VllmServer:
    """A vLLM OpenAI-compatible server over `backbone` with LoRA `adapters` (name -> folder), started
    from `settings.python`; a context manager that stops it on exit.

    The server runs in its own process group, so stopping it also stops the engine processes it spawns.
    """

    def __init__(self, backbone: Path, adapters: dict[str, Path], settings: VllmConfig):
        self.backbone = Path(backbone)
        self.adapters = {name: Path(folder) for name, folder in adapters.items()}
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.url = ""
        self._log = None

    def command(self, port: int) -> list[str]:
        settings = self.settings
        command = [str(self.python), "-m", "vllm.entrypoints.openai.api_server",
                   "--model", str(self.backbone), "--served-model-name", BACKBONE_MODEL,
                   "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
                   "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len),
                   "--gpu-memory-utilization", str(settings.memory_share),
                   "--tensor-parallel-size", str(settings.tensor_parallel_size),
                   "--uvicorn-log-level", "warning"]
        if self.adapters:
            ranks = [json.loads((folder / "adapter_config.json").read_text())["r"] for folder in self.adapters.values()]
            command += ["--enable-lora", "--max-lora-rank", str(lora_rank_bound(max(ranks))),
                        "--max-loras", str(len(self.adapters)),
                        "--lora-modules", *(f"{name}={folder}" for name, folder in self.adapters.items())]
        return command + list(settings.extra_args)

    @property
    def python(self) -> Path:
        return Path(self.settings.python or vllm_python_default())

    def start(self) -> VllmServer:
        if not self.python.exists():
            raise VllmError(f"no vLLM Python at {self.python}: run `bash scripts/install_vllm.sh` (the optional vLLM "
                            "environment), set vllm.python to one that has vLLM, or vllm.url to a running server")
        port = self.settings.port or _free_port()
        self.url = f"http://127.0.0.1:{port}"
        # Offline: vLLM otherwise waits on the model hub. Every core: its CPU worker defaults to one thread.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(os.cpu_count() or 1),
               "VLLM_CONFIGURE_LOGGING": "1"}
        self._log = tempfile.NamedTemporaryFile(prefix="bsharedrag-vllm-", suffix=".log", delete=False)
        log.info("starting vLLM on %s (%s; its log: %s)", self.url, self.backbone, self._log.name)
        self.process = subprocess.Popen(self.command(port), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_end_with_parent)
        client = VllmClient(self.url, [])
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while not client.ready():
            if self.process.poll() is not None:
                raise VllmError(f"vLLM exited with status {self.process.returncode} while starting:\n{self._tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise VllmError(f"vLLM did not answer within vllm.startup_timeout_s={self.settings.startup_timeout_s}"
                                f" s:\n{self._tail()}")
            time.sleep(1.0)
        log.info("vLLM is ready on %s", self.url)
        return self

    def _tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        import signal

        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def vllm_python_default() -> Path:
    """`.venv-vllm/bin/python` beside this checkout's `.venv`, where `scripts/install_vllm.sh` puts it."""
    prefix = Path(sys.prefix)
    return prefix.parent / ".venv-vllm" / "bin" / "python"
