"""Benchmark the contrastive side: training throughput and memory vs open_clip, embedding throughput vs transformers,
and the per-process memory of the multi-process SigLIP loss.

    python benchmarks/bench_contrastive.py train --batch 8 --steps 3       # SigLIP-B/16 (random): nanopali vs open_clip
    python benchmarks/bench_contrastive.py embed --batch 16 --steps 3      # image / text features: nanopali vs transformers
    python benchmarks/bench_contrastive.py loss-memory                     # B_global 4096 over 4 gloo processes

train: the same SigLIP-B/16-sized model (ViT-B/16 at 224 px with attention pooling, a 12-layer 768-wide text tower
over 64 tokens, 32000 ids; random weights) built by open_clip (`create_model("ViT-B-16-SigLIP", pretrained=None)`,
timm's ViT) and by nanopali (SigLIPConfig of the same sizes), one training step each on the same random batch:
forward, the sigmoid loss (open_clip's SigLipLoss / nanopali's), backward, AdamW. open_clip needs timm and
torchvision, which do not install beside the CPU torch 2.13 wheel: run this part in an environment with
`pip install torch==2.14.1 torchvision==0.29.1 timm open_clip_torch` and nanopali (`pip install --no-deps -e .`).
embed: transformers' SiglipModel loads nanopali's saved random weights; get_image_features / get_text_features.
Each (part, framework) runs in its own subprocess, so peak RSS (ru_maxrss) is its own; step 0 is a warm-up and
the tables show medians and the ratio nanopali / reference, with the share of the CPUs other processes took.

loss-memory: each process holds B_global / W random image and text features (D = 768) and runs the SigLIP loss
forward and backward; the peak RSS above the process's baseline is the loss's memory (glibc's mmap threshold is
fixed for the workers, so that RSS follows live memory). nanopali's ring (only one
B_l x B_l block of logits at a time, recomputed in the backward) against open_clip's SigLipLoss (its bidirectional
exchange keeps every block's graph for the backward: B_l x B_global) and against one process computing the whole
B_global x B_global loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_generate import cpu_seconds, other_load, peak_rss_gib  # the generation benchmark's measurements

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=16, vision_use_head=True),
            text=dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=64))


def nanopali_model(sizes=BASE):
    from nanopali.config import VisionConfig
    from nanopali.models.contrastive import SigLIP
    from nanopali.siglip_config import SigLIPConfig, SiglipTextConfig

    torch.manual_seed(0)
    return SigLIP(SigLIPConfig(SiglipTextConfig(**sizes["text"]), VisionConfig(**sizes["vision"]))).init_weights()


def batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(pixel_values=torch.rand(n, 3, 224, 224, generator=g) * 2 - 1,
                input_ids=torch.randint(0, 32000, (n, 64), generator=g))


def timed_steps(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times[1:]  # step 0 warms up


# ------------------------------------------------------------------------------------ workers (one per process)

def worker_train(framework: str, n: int, steps: int) -> dict:
    inputs = batch(n)
    if framework == "nanopali":
        model = nanopali_model().train()

        def loss():
            return model(**inputs, return_loss=True).loss
    else:
        import open_clip
        model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None).train()
        criterion = open_clip.loss.SigLipLoss()

        def loss():
            image, text, scale, bias = model(inputs["pixel_values"], inputs["input_ids"])
            return criterion(image, text, scale, bias)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        value = loss()
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = sum(p.numel() for p in model.parameters())
    before, start = cpu_seconds(), time.perf_counter()
    times = timed_steps(step, steps)
    return {"params": params, "times": times, "peak_rss_gib": peak_rss_gib(),
            "cpu_share": other_load(before, cpu_seconds(), time.perf_counter() - start)}


def worker_embed(framework: str, n: int, steps: int, folder: str) -> dict:
    inputs = batch(n)
    if framework == "nanopali":
        from nanopali.models.contrastive import SigLIP
        model = SigLIP.from_pretrained(folder).eval()
        image, text = model.get_image_features, model.get_text_features
    else:
        from transformers import SiglipModel
        model = SiglipModel.from_pretrained(folder).eval()
        image = lambda px: model.get_image_features(pixel_values=px).pooler_output  # noqa: E731
        text = lambda ids: model.get_text_features(input_ids=ids).pooler_output  # noqa: E731
    with torch.no_grad():
        out = {"image": timed_steps(lambda: image(inputs["pixel_values"]), steps),
               "text": timed_steps(lambda: text(inputs["input_ids"]), steps)}
    return {**out, "peak_rss_gib": peak_rss_gib()}


def worker_loss(impl: str, global_batch: int, dim: int) -> dict | None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from nanopali.nn.contrastive import siglip_loss
    from nanopali.train.losses import ring_siglip_loss

    world, rank = 1, 0
    if impl != "single":
        dist.init_process_group("gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    n = global_batch // world
    image = torch.randn(n, dim, generator=g).requires_grad_()
    text = torch.randn(n, dim, generator=g).requires_grad_()
    scale, bias = torch.tensor([2.3], requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    small = torch.randn(8, dim).requires_grad_()  # warm every code path on tiny inputs first
    siglip_loss(small, small, scale, bias).backward()
    baseline = peak_rss_gib()
    start = time.perf_counter()
    if impl == "ring":
        loss = ring_siglip_loss(image, text, scale, bias)
    elif impl == "single":
        loss = siglip_loss(image, text, scale, bias)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from open_clip_reference import open_clip_loss
        loss = open_clip_loss().SigLipLoss(rank=rank, world_size=world)(
            F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale.exp(), bias)
    loss.backward()
    seconds = time.perf_counter() - start
    result = {"impl": impl, "world": world, "global_batch": global_batch, "local_batch": n,
              "loss_peak_mib": (peak_rss_gib() - baseline) * 1024, "seconds": seconds}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        dist.destroy_process_group()
        if rank:
            return None
        result["loss_peak_mib"] = max(r["loss_peak_mib"] for r in gathered)
    return result


# ------------------------------------------------------------------------------------ driver

def run_worker(args: list[str], world: int = 1) -> dict:
    # A fixed mmap threshold: glibc then returns every freed large tensor to the system at once, so the peak RSS
    # follows the peak of live memory (with its default, rising threshold, freed blocks stay in the heap).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--standalone"]
                if world > 1 else [sys.executable])
    proc = subprocess.run([*launcher, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"worker {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def alternate(part: str, frameworks: tuple[str, str], args: list[str], rounds: int) -> dict[str, dict]:
    """Each framework's worker `rounds` times, alternating (A B B A A B ...), so that a neighbour's load falls on both
    alike: the timings of all rounds pooled, the largest peak RSS, the mean share of the CPUs others took."""
    rows: dict[str, list[dict]] = {fw: [] for fw in frameworks}
    for r in range(rounds):
        for fw in (frameworks if r % 2 == 0 else frameworks[::-1]):
            rows[fw].append(run_worker([part, fw, *args]))
    merged = {}
    for fw, results in rows.items():
        merged[fw] = {**results[0], "peak_rss_gib": max(x["peak_rss_gib"] for x in results)}
        if "cpu_share" in results[0]:
            merged[fw]["cpu_share"] = statistics.mean(x["cpu_share"] for x in results)
        for key in ("times", "image", "text"):
            if key in results[0]:
                merged[fw][key] = [t for x in results for t in x[key]]
    return merged


def main() -> None:
    if "--worker" in sys.argv:
        part, *rest = sys.argv[sys.argv.index("--worker") + 1:]
        fn = {"train": worker_train, "embed": worker_embed, "loss": worker_loss}[part]
        out = fn(*[int(x) if x.isdigit() else x for x in rest])
        if out is not None:
            print(json.dumps(out))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["train", "embed", "loss-memory"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="train/embed: workers per framework, alternating")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    if args.part == "train":
        rows = alternate("train", ("open_clip", "nanopali"), [str(args.batch), str(args.steps)], args.rounds)
        print(f"\nSigLIP-B/16 training step, batch {args.batch}, fp32 (median of {args.rounds} x {args.steps} steps, "
              "each worker after a warm-up step)")
        print("| framework | parameters | s/step | examples/s | ratio | peak RSS GiB | ratio | others' CPU share |")
        print("|---|---|---|---|---|---|---|---|")
        ref = rows["open_clip"]
        for fw, r in rows.items():
            med = statistics.median(r["times"])
            speed = args.batch / med
            print(f"| {fw} | {r['params'] / 1e6:.1f} M | {med:.2f} | {speed:.2f} | "
                  f"{speed / (args.batch / statistics.median(ref['times'])):.2f}x | {r['peak_rss_gib']:.2f} | "
                  f"{r['peak_rss_gib'] / ref['peak_rss_gib']:.2f}x | {r['cpu_share']:.0%} |")
    elif args.part == "embed":
        with tempfile.TemporaryDirectory() as folder:
            nanopali_model().save_pretrained(folder)
            rows = alternate("embed", ("transformers", "nanopali"), [str(args.batch), str(args.steps), folder],
                             args.rounds)
        print(f"\nSigLIP-B/16 features, batch {args.batch}, fp32, no grad (median of {args.rounds} x {args.steps} calls)")
        print("| framework | images/s | ratio | texts/s | ratio | peak RSS GiB |")
        print("|---|---|---|---|---|---|")
        ref = rows["transformers"]
        for fw, r in rows.items():
            img, txt = (args.batch / statistics.median(r[k]) for k in ("image", "text"))
            ref_img, ref_txt = (args.batch / statistics.median(ref[k]) for k in ("image", "text"))
            print(f"| {fw} | {img:.1f} | {img / ref_img:.2f}x | {txt:.1f} | {txt / ref_txt:.2f}x | {r['peak_rss_gib']:.2f} |")
    else:
        cases = [("single", 4096, 1), ("open_clip", 4096, 4), ("ring", 4096, 4), ("ring", 2048, 2), ("ring", 2048, 4),
                 ("ring", 4096, 2)]
        print("\nSigLIP loss forward + backward, D = 768: peak RSS above each process's baseline (the largest process)")
        print("| implementation | processes | B_global | B_local | loss peak MiB | seconds |")
        print("|---|---|---|---|---|---|")
        for impl, global_batch, world in cases:
            r = run_worker(["loss", impl, str(global_batch), "768"], world=world)
            print(f"| {impl} | {world} | {global_batch} | {r['local_batch']} | {r['loss_peak_mib']:.0f} | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
