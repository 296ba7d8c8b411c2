"""Load test of a bsharedrag server on loopback: p50/p95 latency and throughput per endpoint and concurrency.

    python scripts/load_test.py --url http://127.0.0.1:8000                 # a server you started
    python scripts/load_test.py --run runs/quick --ask-requests 16          # starts `bsharedrag serve` itself

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

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - started
    row = {"endpoint": endpoint, "clients": clients, "requests": requests, "errors": len(errors),
           "throughput_rps": round(len(latencies) / wall, 2)}
    if latencies:
        row |= {"p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
                "p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 1)}
    if endpoint == "ask" and firsts:
        row |= {"ttft_p50_ms": round(float(np.percentile(firsts, 50)) * 1000, 1)}
    if errors:
        row["first_error"] = errors[0]
    return row


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
        for endpoint in args.endpoints:
            levels = (args.ask_concurrency or args.concurrency) if endpoint == "ask" else args.concurrency
            requests = args.ask_requests if endpoint == "ask" else args.requests
            asyncio.run(level(url, endpoint, 1, 2, args.max_new_tokens, key))  # warm-up
            for clients in levels:
                rows.append(asyncio.run(level(url, endpoint, clients, requests, args.max_new_tokens, key)))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    print(f"\n{'endpoint':8} {'clients':>7} {'requests':>8} {'errors':>6} {'p50 ms':>9} {'p95 ms':>9} {'req/s':>8}")
    for row in rows:
        print(f"{row['endpoint']:8} {row['clients']:>7} {row['requests']:>8} {row['errors']:>6} "
              f"{row.get('p50_ms', '-'):>9} {row.get('p95_ms', '-'):>9} {row['throughput_rps']:>8}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
