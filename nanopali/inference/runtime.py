"""How a loaded model runs inference: one object with every runtime choice, and `prepare` that applies them.

    runtime = prepare(model, quantize="int8", cpu_kernels=True, cuda_graphs=True)   # compile=True: GPU opt-in
    tokens = generate(model, **batch, runtime=runtime)

The model files are plain PyTorch; speed-ups are transforms of a loaded model: quantize.py and
cpu_kernels.install replace modules (same parameters), and the Runtime holds what the decode loop needs
to know (the CPU kernels' state and step chooser, whether to replay decode steps as CUDA graphs, whether to run
them through torch.compile). A model that was never prepared runs with `Runtime()`: its own modules, CUDA graphs
on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanopali.errors import UsageError
from nanopali.inference.compiled import CompiledStep
from nanopali.inference.cpu_kernels import MEASURE_MIN_PARAMS, PLAIN, CpuKernels, adopt, install
from nanopali.inference.quantize import check_mode, quantized_mode
from nanopali.inference.quantize import quantize as quantize_model
from nanopali.models.gemma import GemmaDecoder
from nanopali.models.paligemma import PaliGemma


@dataclass
class Runtime:
    kernels: CpuKernels = field(default_factory=lambda: PLAIN)  # the CPU kernels the model's modules use
    cuda_graphs: bool = True            # on CUDA, capture the decode step once and replay it (cuda_graph.py)
    cuda_graph_failed: bool = False     # set when a capture failed: later steps run eagerly, without retrying
    compile: bool = False               # run the decode step through torch.compile (compiled.py)
    compiled: dict = field(default_factory=dict, repr=False)  # step function -> its CompiledStep, made at first use

    def run_step(self, step):
        """Run one decode step (a zero-argument function) on the CPU kernels' chosen one-row path."""
        return self.kernels.run_step(step)

    def step_function(self, fn):
        """`fn` (a decode step function), or with compile=True its compiled form, one per runtime and function:
        every generation of this runtime reuses its compilations."""
        if not self.compile:
            return fn
        if fn not in self.compiled:
            self.compiled[fn] = CompiledStep(fn)
        return self.compiled[fn]


def check_compile(compile: bool, device: torch.device, cpu_kernels: bool) -> None:
    """UsageError for compile=True on the CPU with the CPU kernels: they are native code torch.compile cannot trace."""
    if compile and torch.device(device).type == "cpu" and cpu_kernels:
        raise UsageError("compile=True on the CPU compiles the plain modules, not the CPU kernels (native code "
                         "torch.compile cannot trace), which are the CPU's fast path: pass cpu_kernels=False with it "
                         "(--no-fast), or leave compile off on the CPU")


def prepare(model: PaliGemma, quantize: str | None = None, cpu_kernels: bool = True, cuda_graphs: bool = True,
            force_path: str | None = None, compile: bool = False) -> Runtime:
    """Make a loaded PaliGemma ready for inference, in place, and return its Runtime.

    quantize="int8" | "int4": the decoder's weights (quantize.py); a model that `quantize.load_quantized` read in that
    mode is taken as it is. cpu_kernels=False keeps torch's plain ops and cuda_graphs=False an eager decode step:
    together, the debugging switch (`--no-fast`).
    force_path="native" | "loop" | "library": the one-row product path, instead of timing them (cpu_kernels.py).
    compile=True: the decode step through torch.compile (compiled.py; the first generation compiles for seconds
    to a minute), for a GPU; the CPU kernels are then not installed (they never run on a GPU), and on the CPU it
    needs cpu_kernels=False, since the CPU kernels (the CPU's fast path) are native code torch.compile cannot trace.
    """
    check_compile(compile, next(model.parameters()).device, cpu_kernels)
    with torch.device("meta"):  # the float decoder's size, whether or not this one is quantized already
        decoder_params = sum(p.numel() for p in GemmaDecoder(model.config.text_config).parameters())
    kernels = CpuKernels(enabled=cpu_kernels and not compile, measure=decoder_params >= MEASURE_MIN_PARAMS, force=force_path)
    mode = quantized_mode(model)
    if quantize is not None:
        check_mode(quantize)
        if mode is None:
            quantize_model(model, quantize, kernels=kernels)
        elif mode != quantize:
            raise UsageError(f"the model was quantized to {mode} already; it cannot be prepared as {quantize}")
    adopt(model, kernels)  # modules quantized before (load_quantized) or prepared before follow these kernels
    if cpu_kernels and not compile:
        install(model, kernels)
    model.eval()
    return Runtime(kernels=kernels, cuda_graphs=cuda_graphs, compile=compile)
