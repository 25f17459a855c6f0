"""Benchmark `nanopali serve`: throughput and latency on loopback at 1, 4, 16 and 32 concurrent clients, against
the same requests sent one at a time to the pipeline (Pali) in this process.

    python benchmarks/bench_serve.py                                  # the shipped default model, ~3 minutes
    python benchmarks/bench_serve.py --model checkpoints/pg-3b-224-random --clients 1 4 --requests 1 \\
        --min-requests 4 --sequential 4 --warm 1 --max-tokens 8 --threads 2   # a full-size random checkpoint, bounded

The workload (--workload) is the six example images (examples/world-*.png) in turn with either a mix of five
prompts of different answer lengths (caption, a question, OCR, detect, segment: "mix") or captions only
("caption"), greedy, each with its task's default max_new_tokens unless --max-tokens is given. The sequential
baseline calls the pipeline for each request in turn (Pali.caption /
answer / ocr / detect / segment: what a script without a server does), before and after the server runs, in
the same number of torch threads as the server; its requests/s is the mean of the two. The server runs in a
subprocess (`nanopali serve --port 0 --max-batch B --threads T`); each client is a thread that sends its
requests one after another over one keep-alive connection (http.client, the lightest client: the clients share
the CPUs with the server; non-streaming chat completions), so `clients` requests are in flight
at a time. Reported per level: requests/s, generated tokens/s (usage.completion_tokens), p50 / p95 latency,
the mean rows per decode step (the server's nanopali_batch_size metric), the ratio of requests/s to the
sequential baseline, and how much of the machine's CPUs other processes used meanwhile (/proc/stat minus this
process and the server): on a shared machine compare ratios measured in one run, never numbers across runs.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {  # answers of the default model: 1-3 tokens (answer, ocr), ~10 a box (detect), ~21 (caption, segment)
    "mix": ["caption en", "answer en what color is the star?", "ocr", "detect star ; square", "segment triangle"],
    "caption": ["caption en"],
}


def workload(n: int, prompts: list[str]) -> list[tuple[Path, str]]:
    images = sorted((ROOT / "examples").glob("world-*.png"))
    return [(images[i % len(images)], prompts[i % len(prompts)]) for i in range(n)]


class CpuMeter:
    """The share of all CPUs that processes other than this one and `pid` used between start() and stop()."""

    def __init__(self, pid: int | None = None):
        self.pid = pid

    def _read(self):
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait (jiffies)
        ours = sum(os.times()[:2]) * os.sysconf("SC_CLK_TCK")
        if self.pid is not None:
            stat = open(f"/proc/{self.pid}/stat").read().rsplit(")", 1)[1].split()
            ours += int(stat[11]) + int(stat[12])
        return busy, ours, time.monotonic()

    def start(self):
        self.begin = self._read()
        return self

    def stop(self) -> float:
        busy, ours, t = self._read()
        elapsed = (t - self.begin[2]) * os.sysconf("SC_CLK_TCK") * os.cpu_count()
        return max(0.0, (busy - self.begin[0]) - (ours - self.begin[1])) / elapsed


def sequential(pali, requests, max_tokens: int | None) -> dict:
    from nanopali.pipeline import prompt_task

    options = {"max_new_tokens": max_tokens} if max_tokens else {}
    latencies, tokens, meter = [], 0, CpuMeter().start()
    start = time.perf_counter()
    for image, prompt in requests:
        t = time.perf_counter()
        task = prompt_task(prompt)
        if task in ("detect", "segment"):
            getattr(pali, task)(str(image), prompt.split(" ", 1)[1].split(" ; "), **options)
        elif task == "answer":
            pali.answer(str(image), prompt.split(" ", 2)[2], **options)
        else:
            getattr(pali, task)(str(image), **options)
        tokens += pali.stats["new_tokens"]
        latencies.append(time.perf_counter() - t)
    return summary(len(requests), tokens, time.perf_counter() - start, latencies, meter.stop())


def summary(requests: int, tokens: int, seconds: float, latencies: list[float], others: float, **extra) -> dict:
    cuts = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"requests": requests, "req_s": requests / seconds, "tok_s": tokens / seconds, "seconds": seconds,
            "p50": statistics.median(latencies), "p95": cuts[18], "others": others, **extra}


def start_server(args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "nanopali", "serve", "--port", "0", "--max-batch", str(args.max_batch),
               "--max-queue", "1024", "--threads", str(args.threads), "--dtype", args.dtype, "--log-level", "warning",
               "--served-model-name", "bench"] + (["--model", args.model] if args.model else [])
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    line = ""
    while "serving" not in line:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            raise SystemExit("the server did not start")
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # keep draining
    url = re.search(r"on (http://\S+)", line).group(1)
    while httpx.get(url + "/health").status_code != 200:
        time.sleep(0.2)
    return process, url


def batch_rows(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics").text
    found = re.finditer(r"^(nanopali_batch_size_(?:sum|count)) (\S+)$", text, re.M)
    value = {m.group(1): float(m.group(2)) for m in found}
    return value.get("nanopali_batch_size_sum", 0.0), value.get("nanopali_batch_size_count", 0.0)


def concurrent(url: str, pid: int, requests, clients: int, max_tokens: int | None) -> dict:
    bodies = []
    for image, prompt in requests:
        data = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        body = {"model": "bench", "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": data}}]}]}
        bodies.append(body | ({"max_tokens": max_tokens} if max_tokens else {}))
    latencies, tokens, failures, lock, next_index = [], [0], [], threading.Lock(), [0]

    host, port = url.removeprefix("http://").rsplit(":", 1)
    payloads = [json.dumps(body).encode() for body in bodies]

    def client():  # http.client with keep-alive: the lightest client, so that it takes little of the shared CPUs
        http = HTTPConnection(host, int(port), timeout=3600)
        while True:
            with lock:
                i, next_index[0] = next_index[0], next_index[0] + 1
            if i >= len(payloads):
                http.close()
                return
            t = time.perf_counter()
            http.request("POST", "/v1/chat/completions", payloads[i], {"Content-Type": "application/json"})
            reply = http.getresponse()
            data = reply.read()
            with lock:
                latencies.append(time.perf_counter() - t)
                if reply.status == 200:
                    tokens[0] += json.loads(data)["usage"]["completion_tokens"]
                else:
                    failures.append(reply.status)
    rows_before, steps_before = batch_rows(url)
    meter, start = CpuMeter(pid).start(), time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds, others = time.perf_counter() - start, meter.stop()
    rows, steps = (a - b for a, b in zip(batch_rows(url), (rows_before, steps_before)))
    if failures:
        raise SystemExit(f"{len(failures)} requests failed: {sorted(set(failures))}")
    return summary(len(bodies), tokens[0], seconds, latencies, others, rows=rows / max(steps, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the shipped default model)")
    p.add_argument("--dtype", default="bfloat16", help="what both sides load (default bfloat16, the server's)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--requests", type=int, default=4,
                   help="requests per client at each level (at least --min-requests)")
    p.add_argument("--min-requests", type=int, default=20)
    p.add_argument("--sequential", type=int, default=20, help="requests of the sequential baseline (each time)")
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads, of the server and of the baseline")
    p.add_argument("--max-tokens", type=int, help="max new tokens of every request (default: each task's)")
    p.add_argument("--workload", choices=list(WORKLOADS), default="mix")
    p.add_argument("--warm", type=int, default=6, help="warm-up requests before each side is timed")
    args = p.parse_args()

    import nanopali

    torch.set_num_threads(args.threads)
    prompts = WORKLOADS[args.workload]
    print(f"# {args.model or 'the shipped default model'}, {args.dtype}, {args.workload} workload, "
          f"{args.threads} torch thread(s), server "
          f"--max-batch {args.max_batch}, {os.cpu_count()} CPUs", flush=True)
    pali = nanopali.load(args.model, dtype=args.dtype)
    warm = workload(args.warm, prompts)
    sequential(pali, warm, args.max_tokens)  # compile/caches warm
    before = sequential(pali, workload(args.sequential, prompts), args.max_tokens)
    print(f"sequential (before): {before['req_s']:.2f} req/s", flush=True)
    del pali
    gc.collect()  # one model in memory at a time (a 3B checkpoint is 5.9 GB)

    server, url = start_server(args)
    results = {}
    try:
        concurrent(url, server.pid, warm, min(2, len(warm)), args.max_tokens)  # warm the server
        for clients in args.clients:
            n = max(args.min_requests, args.requests * clients)
            results[clients] = concurrent(url, server.pid, workload(n, prompts), clients, args.max_tokens)
            r = results[clients]
            print(f"{clients} clients: {r['req_s']:.2f} req/s, {r['rows']:.1f} rows/step", flush=True)
    finally:
        server.terminate()
        server.wait()

    pali = nanopali.load(args.model, dtype=args.dtype)
    sequential(pali, warm, args.max_tokens)
    after = sequential(pali, workload(args.sequential, prompts), args.max_tokens)
    baseline = (before["req_s"] + after["req_s"]) / 2
    print("\n| mode | clients | requests | req/s | tokens/s | p50 s | p95 s | rows/step | × sequential req/s | "
          "other processes' CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in (("pipeline, one at a time (before)", before), ("pipeline, one at a time (after)", after)):
        print(f"| {name} | 1 | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} "
              f"| 1 | {r['req_s'] / baseline:.2f} | {r['others']:.0%} |")
    for clients, r in results.items():
        print(f"| server | {clients} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['p50']:.2f} | "
              f"{r['p95']:.2f} | {r['rows']:.1f} | **{r['req_s'] / baseline:.2f}** | {r['others']:.0%} |")


if __name__ == "__main__":
    main()
