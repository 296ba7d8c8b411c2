"""Load test of a bsharedrag server on loopback: p50/p95 latency and throughput per endpoint and concurrency.

    python scripts/load_test.py --url http://127.0.0.1:8000                 # a server you started
    python scripts/load_test.py --run runs/quick --ask-requests 16          # starts `bsharedrag serve` itself
    BSHAREDRAG_API_KEY=k python scripts/load_test.py --run runs/quick --mixed 3 --upsert-during 1500 \
        --set serve.max_batch_documents=1500 --set serve.max_body_bytes=4000000

`--mixed R` sends R rounds of 20 searches, 5 streaming asks and 2 upserts at once; `--upsert-during N`
times searches (4 clients) while one upsert of N documents runs. Both need the API key for upserts,
and both remove the documents they added.

Every level sends a bounded number of requests (`--requests`, `--ask-requests`) from N concurrent
clients; only loopback addresses are accepted, so the script can never load someone else's server.
`/v1/ask` is streamed (SSE), which also gives the time to the first answer token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
QUESTIONS = [
    "how long does it take to boil water?", "does the case fit the zeta 11?", "is the mat slippery?",
    "will my 15 inch laptop fit in the backpack?", "how is the lamp powered?", "does it keep drinks cold?",
    "is the lid stainless steel?", "what colours are available?", "耳机续航多久？", "is it dishwasher safe?",
    "how thick is the yoga mat?", "does it support fast charging?",
]


async def _one(http: httpx.AsyncClient, endpoint: str, question: str, max_new_tokens: int) -> tuple[float, float]:
    """(latency, time to first token) in seconds; raises on any error."""
    started = time.perf_counter()
    if endpoint == "search":
        response = await http.post("/v1/search", json={"question": question})
        response.raise_for_status()
        latency = time.perf_counter() - started
        return latency, latency
    body = {"question": question, "stream": True, "max_new_tokens": max_new_tokens}
    first = None
    async with http.stream("POST", "/v1/ask", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line.startswith("event: token"):
                first = time.perf_counter() - started
            if line.startswith("event: error"):
                raise RuntimeError("the server reported a generation error")
    latency = time.perf_counter() - started
    return latency, first if first is not None else latency


async def level(url: str, endpoint: str, clients: int, requests: int, max_new_tokens: int, key: str | None) -> dict:
    """Send `requests` requests from `clients` concurrent clients; summarise latencies and throughput."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    latencies, firsts, errors = [], [], []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:

        async def client() -> None:
            for n in counter:
                try:
                    latency, first = await _one(http, endpoint, QUESTIONS[n % len(QUESTIONS)], max_new_tokens)
                except (httpx.HTTPError, RuntimeError) as error:
                    errors.append(repr(error))
                else:
                    latencies.append(latency)
                    firsts.append(first)

        tokens_before = await _generated_tokens(http)
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - started
        tokens = await _generated_tokens(http) - tokens_before
    row = {"endpoint": endpoint, "clients": clients, "requests": requests, "errors": len(errors),
           "throughput_rps": round(len(latencies) / wall, 2)}
    if endpoint == "ask":
        row["generated_tokens_per_s"] = round(tokens / wall, 1)
    if latencies:
        row |= {"p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
                "p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 1)}
    if endpoint == "ask" and firsts:
        row |= {"ttft_p50_ms": round(float(np.percentile(firsts, 50)) * 1000, 1),
                "ttft_p95_ms": round(float(np.percentile(firsts, 95)) * 1000, 1)}
    if errors:
        row["first_error"] = errors[0]
    return row


async def _generated_tokens(http: httpx.AsyncClient) -> float:
    """The server's count of answer tokens generated so far (from /metrics)."""
    response = await http.get("/metrics")
    response.raise_for_status()
    return sum(float(line.rsplit(" ", 1)[1]) for line in response.text.splitlines()
               if line.startswith("bsharedrag_generated_tokens_total"))


def _documents(prefix: str, count: int) -> list[dict]:
    return [{"_id": f"{prefix}-{n}", "title": f"Load test item {n}", "product_id": f"{prefix}-product",
             "text": f"Load test passage {n}: a stainless steel kettle of 1.{n % 9} litres with a 2 kW element."}
            for n in range(count)]


async def _upsert(http: httpx.AsyncClient, docs: list[dict]) -> float:
    started = time.perf_counter()
    response = await http.put("/v1/documents", json={"documents": docs})
    response.raise_for_status()
    return time.perf_counter() - started


async def _remove(http: httpx.AsyncClient, docs: list[dict]) -> None:
    for doc in docs:
        await http.delete(f"/v1/documents/{doc['_id']}")


def _summary(endpoint: str, latencies: list[float], errors: list[str], firsts: list[float] | None = None) -> dict:
    row = {"endpoint": endpoint, "requests": len(latencies) + len(errors), "errors": len(errors)}
    if latencies:
        row |= {"p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
                "p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 1)}
    if firsts:
        row |= {"ttft_p50_ms": round(float(np.percentile(firsts, 50)) * 1000, 1),
                "ttft_p95_ms": round(float(np.percentile(firsts, 95)) * 1000, 1)}
    if errors:
        row["first_error"] = errors[0]
    return row


async def mixed(url: str, rounds: int, max_new_tokens: int, key: str | None, upsert_docs: int = 8) -> list[dict]:
    """`rounds` rounds of 20 searches, 5 streaming asks and 2 upserts sent at once (the hostile-input probe's load)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    results: dict[str, tuple[list, list, list]] = {name: ([], [], []) for name in ("search", "ask", "upsert")}
    added: list[dict] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as http:

        async def timed(name: str, job) -> None:
            latencies, firsts, errors = results[name]
            try:
                outcome = await job
            except (httpx.HTTPError, RuntimeError) as error:
                errors.append(repr(error))
            else:
                latency, first = outcome if isinstance(outcome, tuple) else (outcome, None)
                latencies.append(latency)
                if first is not None and name == "ask":
                    firsts.append(first)

        for round_number in range(rounds):
            batches = [_documents(f"mixed-r{round_number}-u{u}", upsert_docs) for u in range(2)]
            added += [doc for batch in batches for doc in batch]
            jobs = [timed("search", _one(http, "search", QUESTIONS[n % len(QUESTIONS)], max_new_tokens))
                    for n in range(20)]
            jobs += [timed("ask", _one(http, "ask", QUESTIONS[n], max_new_tokens)) for n in range(5)]
            jobs += [timed("upsert", _upsert(http, batch)) for batch in batches]
            await asyncio.gather(*jobs)
        await _remove(http, added)
    return [_summary(f"mixed:{name}", *(results[name][0], results[name][2], results[name][1]))
            for name in ("search", "ask", "upsert")]


async def searches_during_upsert(url: str, count: int, key: str | None) -> list[dict]:
    """Search latency from 4 clients while one upsert of `count` documents runs, against the idle baseline."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    docs = _documents("during", count)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=3600) as http:

        async def search_until(done: asyncio.Event | None, limit: int) -> tuple[list, list]:
            latencies, errors = [], []
            while (done is None or not done.is_set()) and len(latencies) + len(errors) < limit:
                try:
                    latencies.append((await _one(http, "search", QUESTIONS[len(latencies) % len(QUESTIONS)], 0))[0])
                except httpx.HTTPError as error:
                    errors.append(repr(error))
            return latencies, errors

        idle = await asyncio.gather(*(search_until(None, 10) for _ in range(4)))
        done = asyncio.Event()

        async def upsert() -> float:
            try:
                return await _upsert(http, docs)
            finally:
                done.set()

        upsert_task = asyncio.ensure_future(upsert())
        during = await asyncio.gather(*(search_until(done, 10_000) for _ in range(4)))
        upsert_seconds = await upsert_task
        await _remove(http, docs)
    flat = lambda parts, i: [value for part in parts for value in part[i]]  # noqa: E731
    return [_summary("search (idle)", flat(idle, 0), flat(idle, 1)),
            _summary(f"search (during a {count}-document upsert)", flat(during, 0), flat(during, 1)),
            {"endpoint": f"upsert of {count} documents", "requests": 1, "errors": 0,
             "p50_ms": round(upsert_seconds * 1000, 1), "p95_ms": round(upsert_seconds * 1000, 1)}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(run: Path, overrides: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    sets = [arg for item in overrides for arg in ("--set", item)]
    command = [sys.executable, "-c", "from bsharedrag.cli import app; app()", "serve", "--run", str(run),
               "--host", "127.0.0.1", "--port", str(port), *sets]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}; run `bsharedrag serve --run {run}` to see why")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start within 600 s")


def _tree_peak_mib(pid: int) -> int:
    """Peak resident memory (VmHWM) of the server and every process it started (vLLM's engine and worker),
    summed: an upper bound, since pages they share count once in each."""
    import psutil

    def peak(process_id: int) -> float:
        try:
            for line in Path(f"/proc/{process_id}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    children = [child.pid for child in psutil.Process(pid).children(recursive=True)]
    return round(sum(peak(process_id) for process_id in [pid, *children]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="A running server on loopback, e.g. http://127.0.0.1:8000.")
    parser.add_argument("--run", type=Path, help="Start `bsharedrag serve --run RUN` on a free loopback port instead.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="serve.* override for --run.")
    parser.add_argument("--endpoints", nargs="+", default=["search", "ask"], choices=["search", "ask"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 50])
    parser.add_argument("--ask-concurrency", nargs="+", type=int, help="Concurrency levels for ask (default: same).")
    parser.add_argument("--requests", type=int, default=200, help="Search requests per level.")
    parser.add_argument("--ask-requests", type=int, default=50, help="Ask requests per level.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--mixed", type=int, default=0, metavar="ROUNDS",
                        help="Instead: ROUNDS rounds of 20 searches, 5 streaming asks and 2 upserts at once.")
    parser.add_argument("--upsert-during", type=int, default=0, metavar="N",
                        help="Instead (or after --mixed): search latency while one upsert of N documents runs.")
    parser.add_argument("--json", type=Path, help="Also write the rows to this JSON file.")
    args = parser.parse_args()
    if (args.url is None) == (args.run is None):
        parser.error("give exactly one of --url and --run")
    if max(args.requests, args.ask_requests) > 10_000 or min(args.concurrency) < 1 or max(args.concurrency) > 200:
        parser.error("keep it bounded: at most 10000 requests per level and 1-200 clients")
    server = None
    if args.run:
        server, url = _start_server(args.run, args.overrides)
    else:
        url = args.url.rstrip("/")
        if urlparse(url).hostname not in LOOPBACK:
            parser.error(f"only loopback servers may be load-tested, got {urlparse(url).hostname!r}")
    key = os.environ.get("BSHAREDRAG_API_KEY")
    rows = []
    try:
        if args.mixed or args.upsert_during:
            if not 0 <= args.mixed <= 20 or not 0 <= args.upsert_during <= 10_000:
                parser.error("keep it bounded: at most 20 mixed rounds and 10000 upserted documents")
            if args.mixed:
                rows += asyncio.run(mixed(url, args.mixed, args.max_new_tokens, key))
            if args.upsert_during:
                rows += asyncio.run(searches_during_upsert(url, args.upsert_during, key))
            args.endpoints = []
        for endpoint in args.endpoints:
            levels = (args.ask_concurrency or args.concurrency) if endpoint == "ask" else args.concurrency
            requests = args.ask_requests if endpoint == "ask" else args.requests
            asyncio.run(level(url, endpoint, 1, 2, args.max_new_tokens, key))  # warm-up
            for clients in levels:
                rows.append(asyncio.run(level(url, endpoint, clients, requests, args.max_new_tokens, key)))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if server is not None:
            rows.append({"endpoint": "server peak memory", "requests": 0, "errors": 0,
                         "peak_rss_mib": _tree_peak_mib(server.pid)})
            server.terminate()
            server.wait(60)
    print(f"\n{'endpoint':42} {'clients':>7} {'requests':>8} {'errors':>6} {'p50 ms':>9} {'p95 ms':>9} {'req/s':>8}")
    for row in rows:
        print(f"{row['endpoint']:42} {row.get('clients', '-'):>7} {row['requests']:>8} {row['errors']:>6} "
              f"{row.get('p50_ms', '-'):>9} {row.get('p95_ms', '-'):>9} {row.get('throughput_rps', '-'):>8}"
              + (f"  peak {row['peak_rss_mib']} MiB" if "peak_rss_mib" in row else ""))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
