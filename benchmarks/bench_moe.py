"""Benchmark one mixture-of-experts layer, forward + backward: nanopali's SparseMoE vs transformers'
MixtralSparseMoeBlock (each of its expert implementations) and vs a dense GeGLU of the same active FLOPs.

    python benchmarks/bench_moe.py                 # the issue's size: 4096 tokens, E=8, k=2, D=2048, I=4096, bf16
    python benchmarks/bench_moe.py --tokens 256 --hidden 256 --intermediate 512 --runs 2   # smoke check, seconds
    python benchmarks/bench_moe.py --device cuda                     # on a GPU (nanopali takes torch._grouped_mm there)
    python benchmarks/bench_moe.py --models DENSE_DIR MOE_DIR ...    # whole checkpoints: training step and decode

Every implementation gets the same weights (router (E, D), experts (E, 2I, D) and (E, D, I), drawn N(0, 0.02)), the
same input x (tokens, D) ~ N(0, 1) and the same output gradient; one timed run is

    y = layer(x); y.backward(grad); (parameter gradients set to None before the next run)

Implementations: nanopali (nn/moe.SparseMoE: pairs sorted by expert, one GEMM pair per expert on its slice, or
one torch._grouped_mm on CUDA bf16), transformers-eager / -grouped_mm / -batched_mm (MixtralSparseMoeBlock with
that `experts_implementation`), dense (nanopali's GeGLU with intermediate size k·I: the same expert FLOPs per token,
no routing). batched_mm copies each (token, expert) pair's weights, (k·tokens, 2I, D) elements: when that would
exceed --batched-mm-gib it runs at --batched-mm-tokens tokens instead, against nanopali at the same count.

--models times whole checkpoints instead, interleaved the same way: a training step (bench_train.py's batch of
--batch examples, fp32 weights, bf16 autocast, forward + backward + AdamW step) -> examples/s, and greedy decoding
at batch 1 (bench_generate.py's prompt, bf16 weights, prepare()'s default CPU kernels, --new-tokens steps after the
prefill) -> tokens/s; with each model's parameters, total and active (k of the E experts per token).

The runs of all implementations are interleaved (run 1 of each, then run 2 of each, ...), so that a neighbour's
load on a shared machine falls on all of them alike; run 0 is a warm-up. The table shows medians and bests of
the others, each implementation's ratio to nanopali and to dense, whether its output and input gradient agree
with nanopali's (max difference over the output's scale), and the share of the CPUs other processes took
meanwhile (/proc/stat; rerun when it is not near 0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_generate import cpu_seconds, other_load

from nanopali.nn.mlp import GeGLU
from nanopali.nn.moe import SparseMoE, idle_expert_parameters

IMPLEMENTATIONS = ("nanopali", "dense", "transformers-eager", "transformers-grouped_mm", "transformers-batched_mm")


def build(name: str, args, weights: dict) -> torch.nn.Module:
    """The layer `name` with the shared weights, in args.dtype on args.device."""
    D, inter, E, k = args.hidden, args.intermediate, args.experts, args.top_k
    if name == "dense":
        layer = GeGLU(D, k * inter)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(weights["dense"][p.shape])
    elif name == "nanopali":
        layer = SparseMoE(D, inter, E, k)
        layer.gate.weight.data, layer.experts.gate_up_proj.data = weights["router"], weights["gate_up"]
        layer.experts.down_proj.data = weights["down"]
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        config = MixtralConfig(hidden_size=D, intermediate_size=inter, num_local_experts=E, num_experts_per_tok=k,
                               hidden_act="gelu_pytorch_tanh", router_jitter_noise=0.0)
        config._experts_implementation = name.split("-", 1)[1]
        with torch.device("meta"):
            layer = MixtralSparseMoeBlock(config)
        layer.gate.weight = torch.nn.Parameter(weights["router"].clone())
        layer.experts.gate_up_proj = torch.nn.Parameter(weights["gate_up"].clone())
        layer.experts.down_proj = torch.nn.Parameter(weights["down"].clone())
    return layer.to(device=args.device, dtype=args.dtype).train()


def shared_weights(args) -> dict:
    D, inter, E, k = args.hidden, args.intermediate, args.experts, args.top_k
    g = torch.Generator().manual_seed(0)
    draw = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(args.dtype)  # noqa: E731
    dense = {(k * inter, D): draw(k * inter, D), (D, k * inter): draw(D, k * inter)}  # gate and up share a shape
    return {"router": draw(E, D), "gate_up": draw(E, 2 * inter, D), "down": draw(E, D, inter), "dense": dense}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one_run(name: str, layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, device: str):
    """(seconds of one forward + backward, (output, input gradient) in fp32)."""
    for p in layer.parameters():
        p.grad = None
    xi = x.clone().requires_grad_()
    sync(device)
    start = time.perf_counter()
    y = layer(xi.view(1, *x.shape) if name.startswith("transformers") else xi).reshape(x.shape)
    y.backward(grad)
    sync(device)
    return time.perf_counter() - start, (y.detach().float(), xi.grad.float())


def bench_models(args) -> None:
    """Training examples/s and batch-1 decode tokens/s of whole checkpoints, their runs interleaved."""
    from bench_generate import make_inputs
    from bench_train import make_batch

    from nanopali import PaliGemma, PaliGemmaConfig, prepare
    from nanopali.inference.decode import prefill

    models = {}
    for path in args.models:
        config = PaliGemmaConfig.from_pretrained(path)
        train = PaliGemma.from_pretrained(path, dtype=torch.float32).train()
        decode = PaliGemma.from_pretrained(path, dtype=torch.bfloat16)
        total = sum(p.numel() for p in train.parameters())
        models[path] = dict(train=train, opt=torch.optim.AdamW(train.parameters(), lr=1e-5),
                            batch=make_batch(config, args.batch), decode=decode, runtime=prepare(decode),
                            prompt=make_inputs(config, 1, torch.bfloat16), step_s=[], token_s=[], total=total,
                            active=total - idle_expert_parameters(train))
    before, start = cpu_seconds(), time.perf_counter()
    for run in range(args.runs + 1):
        for m in models.values():
            inputs, labels = m["batch"]
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m["train"](**inputs, labels=labels).loss
            loss.backward()
            m["opt"].step()
            m["opt"].zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            with torch.no_grad():
                logits, state = prefill(m["decode"], **m["prompt"], max_new_tokens=args.new_tokens,
                                        runtime=m["runtime"])
                t2 = time.perf_counter()
                for _ in range(args.new_tokens):
                    logits = state.step(m["decode"], logits.argmax(-1))
            t3 = time.perf_counter()
            if run:
                m["step_s"].append(t1 - t0)
                m["token_s"].append((t3 - t2) / args.new_tokens)
    load = other_load(before, cpu_seconds(), time.perf_counter() - start)
    print(f"{torch.get_num_threads()} threads, training batch {args.batch}, decode {args.new_tokens} tokens at batch "
          f"1; other processes took {load:.0%} of the CPUs meanwhile\n")
    print("| checkpoint | parameters (total / active) | training examples/s, median (best) | "
          "decode tokens/s, median (best) |")
    print("|---|---|---|---|")
    for path, m in models.items():
        step, token = statistics.median(m["step_s"]), statistics.median(m["token_s"])
        print(f"| {path} | {m['total'] / 1e6:.1f} M / {m['active'] / 1e6:.1f} M | {args.batch / step:.1f} "
              f"({args.batch / min(m['step_s']):.1f}) | {1 / token:.1f} ({1 / min(m['token_s']):.1f}) |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    p.add_argument("--batched-mm-gib", type=float, default=4.0, help="largest per-pair weight copy batched_mm may make")
    p.add_argument("--batched-mm-tokens", type=int, default=16, help="tokens for batched_mm when the copy is too big")
    p.add_argument("--models", nargs="+", help="checkpoint directories: time their training step and decoding instead")
    p.add_argument("--batch", type=int, default=32, help="--models: training examples per step")
    p.add_argument("--new-tokens", type=int, default=32, help="--models: decode steps timed per run")
    args = p.parse_args(argv)
    if args.models:
        return bench_models(args)
    args.dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    weights = shared_weights(args)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(args.device, args.dtype)
    grad = torch.randn(args.tokens, args.hidden, generator=g).to(args.device, args.dtype)
    E, k, D, inter = args.experts, args.top_k, args.hidden, args.intermediate
    print(f"MoE layer forward + backward: {args.tokens} tokens, E={E}, k={k}, D={D}, I={inter}, {args.dtype}, "
          f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    # (label, implementation, tokens); the runs of all of them are interleaved, so that a neighbour's load on a
    # shared machine falls on every implementation alike
    cases = []
    for name in args.implementations:
        copy_gib = k * args.tokens * 3 * inter * D * x.element_size() / 2**30
        if name == "transformers-batched_mm" and copy_gib > args.batched_mm_gib:
            print(f"{name}: its per-pair weight copies would take {copy_gib:.0f} GiB at {args.tokens} tokens; "
                  f"measured at {args.batched_mm_tokens} tokens, against nanopali at that count")
            cases += [("nanopali@small", "nanopali", args.batched_mm_tokens), (name, name, args.batched_mm_tokens)]
        else:
            cases.append((name, name, args.tokens))
    layers = {label: build(name, args, weights) for label, name, _ in cases}
    times = {label: [] for label, _, _ in cases}
    outs = {}
    before, start = cpu_seconds(), time.perf_counter()
    for run in range(args.runs + 1):
        for label, name, tokens in cases:
            seconds, outs[label] = one_run(name, layers[label], x[:tokens], grad[:tokens], args.device)
            if run:  # run 0 is a warm-up
                times[label].append(seconds)
    load = other_load(before, cpu_seconds(), time.perf_counter() - start)
    median = {label: statistics.median(t) for label, t in times.items()}
    print(f"other processes took {load:.0%} of the CPUs meanwhile\n")
    print("| implementation | tokens | fwd+bwd (s), median | best | vs nanopali | vs dense | output / input-grad "
          "difference vs nanopali |")
    print("|---|---|---|---|---|---|---|")
    for label, name, tokens in cases:
        if label == "nanopali@small":
            continue
        base = "nanopali@small" if tokens != args.tokens else "nanopali"
        ratio = f"{median[label] / median[base]:.2f}x" if base in median else "-"
        vs_dense = f"{median[label] / median['dense']:.2f}x" if "dense" in median and tokens == args.tokens else "-"
        agree = "-"
        if base in outs and name != "dense":
            diffs = [(a - b).abs().max().item() / b.abs().max().item() for a, b in zip(outs[label], outs[base])]
            agree = f"{diffs[0]:.1e} / {diffs[1]:.1e}"
        best = min(times[label])
        print(f"| {label} | {tokens} | {median[label]:.3f} | {best:.3f} | {ratio} | {vs_dense} | {agree} |")


if __name__ == "__main__":
    main()
