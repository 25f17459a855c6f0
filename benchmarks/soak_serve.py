"""Soak `nanopali serve` on loopback: 32 clients for 60 s with good, malformed and oversized requests.

    python benchmarks/soak_serve.py                       # 32 clients, 60 s, the shipped default model
    python benchmarks/soak_serve.py --clients 8 --seconds 10

Every request must be answered with the status its kind calls for (200 or 503 for good ones, 400 / 413 / 422
for the bad ones), none may be lost (a connection error or a client timeout), the server's resident memory
(VmRSS, sampled every --every seconds) must stay flat, and after the storm /health must be 200 and a caption
must equal the one the server gave before it. The server runs with a small queue (--max-queue 8, so that
some good requests meet a full queue: 503) and a 1 MiB body limit (so that oversized bodies are cheap to
send). Prints the counts, the RSS curve and a verdict; exits 1 if anything went wrong. Loopback only, bounded
in time and count.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 2**20


def body(prompt: str, data: bytes, **extra) -> dict:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return {"model": "soak", "temperature": 0, **extra, "messages": [{"role": "user", "content": [
        {"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]}]}


def kinds() -> dict[str, tuple[float, dict, tuple[int, ...]]]:
    """name -> (share of the requests, httpx keyword arguments, the statuses that are right for it)."""
    world = [p.read_bytes() for p in sorted((ROOT / "examples").glob("world-*.png"))]
    big = io.BytesIO()
    Image.new("RGB", (6000, 5000), (9, 99, 199)).save(big, format="PNG")  # 30 Mpx in ~90 kB: over the pixel limit
    json_header = {"Content-Type": "application/json"}
    return {
        "caption": (0.35, dict(json=body("caption en", world[0])), (200, 503)),
        "detect": (0.10, dict(json=body("detect star ; square", world[3])), (200, 503)),
        "question": (0.05, dict(json=body("how many shapes are there?", world[4])), (200, 503)),
        "malformed JSON": (0.15, dict(content=b'{"model": "soak", "messages": [', headers=json_header), (400,)),
        "wrong schema": (0.10, dict(json={"model": "soak", "messages": "caption en"}), (422,)),
        "oversized body": (0.10, dict(content=b"{" + b" " * (LIMIT + 10) + b"}", headers=json_header), (413,)),
        "undecodable image": (0.10, dict(json=body("caption en", os.urandom(5000))), (400,)),
        "decompression bomb": (0.05, dict(json=body("caption en", big.getvalue())), (400,)),
    }


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--every", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    args = p.parse_args()

    command = [sys.executable, "-m", "nanopali", "serve", "--port", "0", "--threads", str(args.threads),
               "--max-queue", "8", "--max-body-bytes", str(LIMIT), "--log-level", "warning",
               "--served-model-name", "soak"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    line = server.stderr.readline()
    url = re.search(r"on (http://\S+)", line).group(1)
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    while httpx.get(url + "/health").status_code != 200:
        time.sleep(0.2)
    table = kinds()
    names, shares = list(table), [table[n][0] for n in table]
    caption = httpx.post(url + "/v1/chat/completions", **table["caption"][1], timeout=60).json()
    rss = [(0.0, rss_mb(server.pid))]
    counts, wrong, lost, lock = collections.Counter(), collections.Counter(), [], threading.Lock()
    start = time.monotonic()
    stop = start + args.seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < stop:
                name = rng.choices(names, shares)[0]
                try:
                    status = http.post(url + "/v1/chat/completions", **table[name][1]).status_code
                except httpx.HTTPError as e:
                    with lock:
                        lost.append((name, type(e).__name__))
                    continue
                with lock:
                    counts[name, status] += 1
                    if status not in table[name][2]:
                        wrong[name, status] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(args.every)
        rss.append((time.monotonic() - start, rss_mb(server.pid)))
    for t in threads:
        t.join()
    health = httpx.get(url + "/health").status_code
    after = httpx.post(url + "/v1/chat/completions", **table["caption"][1], timeout=60).json()
    metrics = httpx.get(url + "/metrics").text
    server.terminate()
    server.wait()

    total = sum(counts.values())
    print(f"{args.clients} clients for {args.seconds:g} s: {total} requests answered, {len(lost)} lost, "
          f"{sum(wrong.values())} with a wrong status\n")
    print("| kind | status | count |\n|---|---|---|")
    for (name, status), n in sorted(counts.items()):
        print(f"| {name} | {status} | {n} |")
    found = re.finditer(r"^nanopali_batch_size_(sum|count) (\S+)$", metrics, re.M)
    steps = {m.group(1): float(m.group(2)) for m in found}
    print(f"\nmean rows per decode step: {steps.get('sum', 0) / max(steps.get('count', 1), 1):.1f}")
    print("\nRSS of the server (MB) over time (s):")
    print(" ".join(f"{t:.0f}:{m:.0f}" for t, m in rss))
    first, peak, last = rss[1][1] if len(rss) > 1 else rss[0][1], max(m for _, m in rss), rss[-1][1]
    print(f"before {rss[0][1]:.0f} MB, after 2 s {first:.0f} MB, peak {peak:.0f} MB, end {last:.0f} MB")
    same = after["choices"][0]["message"]["content"] == caption["choices"][0]["message"]["content"]
    print(f"after the storm: /health {health}, the caption is {'the same' if same else 'DIFFERENT'}")
    ok = not lost and not wrong and health == 200 and same and last < first * 1.25 + 50
    print("verdict:", "OK" if ok else f"FAILED (lost {lost[:5]}, wrong {dict(wrong)})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
