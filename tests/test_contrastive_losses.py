"""The contrastive losses against open_clip's ClipLoss / SigLipLoss, on one process and across 2 and 3 gloo
processes; the multi-process losses against the one-process loss of the whole global batch.

Multi-process runs are real `torch.distributed.run --standalone` launches of a worker script; each process
computes nanopali's loss and open_clip's on its slice of one global batch and writes its losses and gradients,
which the test compares in the parent with the one-process loss and gradients of the whole batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip_reference import open_clip_loss
from torchrun import run_torchrun

from nanopali.nn.contrastive import CLIP_INIT, SIGLIP_INIT, clip_loss, siglip_loss
from nanopali.train.losses import gathered_clip_loss, ring_siglip_loss

ROOT = Path(__file__).resolve().parents[1]
B, D = 12, 16  # the global batch: divisible by 1, 2 and 3 processes


def embeddings(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image, text = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    text[:B // 2] += 2 * image[:B // 2]  # some pairs match, so positives and negatives both matter
    return image, text


def one_process(objective: str, image, text, scale: float, bias: float):
    """Loss and gradients (image, text, logit_scale, logit_bias) of nanopali's one-process loss."""
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    t, b = torch.tensor([scale], requires_grad=True), torch.tensor([bias], requires_grad=True)
    loss = siglip_loss(image, text, t, b) if objective == "siglip" else clip_loss(image, text, t)
    loss.backward()
    return loss.detach(), image.grad, text.grad, t.grad, b.grad


def open_clip_one_process(objective: str, image, text, scale: float, bias: float):
    """The same through open_clip, which takes normalized features and exp(t')."""
    oc = open_clip_loss()
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    t, b = torch.tensor([scale], requires_grad=True), torch.tensor([bias], requires_grad=True)
    img, txt = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    loss = oc.SigLipLoss()(img, txt, t.exp(), b) if objective == "siglip" else oc.ClipLoss()(img, txt, t.exp())
    loss.backward()
    return loss.detach(), image.grad, text.grad, t.grad, b.grad


@pytest.mark.parametrize("objective", ["siglip", "clip"])
@pytest.mark.parametrize("init", ["paper", "other"])
def test_one_process_equals_open_clip(objective, init):
    image, text = embeddings()
    scale, bias = (SIGLIP_INIT if objective == "siglip" else CLIP_INIT) if init == "paper" else (1.3, -2.5)
    ours = one_process(objective, image, text, scale, bias)
    ref = open_clip_one_process(objective, image, text, scale, bias)
    names = ("loss", "image grad", "text grad", "logit_scale grad", "logit_bias grad")
    for name, a, r in zip(names, ours, ref):
        if objective == "clip" and name == "logit_bias grad":
            assert r is None  # CLIP has no bias
            continue
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6, msg=name)


def test_losses_reduce_to_their_definitions():
    """siglip: -(1/B) Σ log σ(z (t cos + b)); clip: mean of the two cross-entropies — written out by hand."""
    image, text = embeddings(1)
    cos = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    z = 2 * torch.eye(B) - 1
    logits = 10 * cos - 10
    expected = -torch.log(torch.sigmoid(z * logits)).sum() / B
    torch.testing.assert_close(siglip_loss(image, text, torch.tensor([SIGLIP_INIT[0]]), torch.tensor([-10.0])), expected)
    logits = 2 * cos
    ce = -(logits.log_softmax(1).diag().mean() + logits.log_softmax(0).diag().mean()) / 2
    torch.testing.assert_close(clip_loss(image, text, torch.tensor([2.0]).log()), ce)


WORKER = r"""
import json, sys
import torch, torch.distributed as dist, torch.nn.functional as F
sys.path.insert(0, sys.argv[2])
from open_clip_reference import open_clip_loss
from nanopali.train.losses import gathered_clip_loss, ring_siglip_loss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
data = json.loads(open(sys.argv[1]).read())
image, text = torch.tensor(data["image"]), torch.tensor(data["text"])
n = image.shape[0] // world
image, text = image[rank * n:(rank + 1) * n], text[rank * n:(rank + 1) * n]
oc = open_clip_loss()
out = {}
for objective, (scale, bias) in data["params"].items():
    for who in ("nanopali", "open_clip"):
        img, txt = image.clone().requires_grad_(), text.clone().requires_grad_()
        t, b = torch.tensor([scale], requires_grad=True), torch.tensor([bias], requires_grad=True)
        if who == "nanopali":
            loss = (ring_siglip_loss(img, txt, t, b) if objective == "siglip" else gathered_clip_loss(img, txt, t))
        else:
            fi, ft = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
            loss = (oc.SigLipLoss(rank=rank, world_size=world)(fi, ft, t.exp(), b) if objective == "siglip" else
                    oc.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(fi, ft, t.exp()))
        loss.backward()
        out[f"{who}/{objective}"] = {"loss": loss.item(), "image": img.grad.tolist(), "text": txt.grad.tolist(),
                                      "scale": t.grad.item(), "bias": 0.0 if b.grad is None else b.grad.item()}
with open(f"{sys.argv[1]}.{rank}.json", "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


def run_processes(tmp_path: Path, world: int, params: dict) -> list[dict]:
    image, text = embeddings(2)
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"image": image.tolist(), "text": text.tolist(), "params": params}))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_torchrun(tmp_path, script, str(data), str(ROOT / "tests"), processes=world)
    return [json.loads(Path(f"{data}.{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_processes_equal_one_process_and_open_clip(tmp_path, world):
    """Mean of the per-process losses = the one-process loss of the global batch; each process's feature gradients
    = W x the one-process gradient rows of its examples (every process's loss reaches every feature; DDP then
    averages parameter gradients over the W processes); the mean of the temperature/bias gradients = the
    one-process ones. open_clip's losses give the same numbers process by process."""
    params = {"siglip": (1.7, -3.0), "clip": (1.2, 0.0)}
    results = run_processes(tmp_path, world, params)
    image, text = embeddings(2)
    n = B // world
    for objective, (scale, bias) in params.items():
        loss, g_image, g_text, g_scale, g_bias = one_process(objective, image, text, scale, bias)
        ours = [r[f"nanopali/{objective}"] for r in results]
        assert sum(r["loss"] for r in ours) / world == pytest.approx(loss.item(), rel=1e-5)
        got_image = torch.cat([torch.tensor(r["image"]) for r in ours]) / world
        got_text = torch.cat([torch.tensor(r["text"]) for r in ours]) / world
        torch.testing.assert_close(got_image, g_image, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got_text, g_text, rtol=1e-4, atol=1e-6)
        assert sum(r["scale"] for r in ours) / world == pytest.approx(g_scale.item(), rel=1e-4, abs=1e-7)
        if objective == "siglip":
            assert sum(r["bias"] for r in ours) / world == pytest.approx(g_bias.item(), rel=1e-4, abs=1e-7)
        for rank, r in enumerate(results):
            mine, theirs = r[f"nanopali/{objective}"], r[f"open_clip/{objective}"]
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5), f"rank {rank} loss"
            for key in ("image", "text"):
                torch.testing.assert_close(torch.tensor(mine[key]), torch.tensor(theirs[key]), rtol=1e-4, atol=1e-6)
            assert mine["scale"] == pytest.approx(theirs["scale"], rel=1e-4, abs=1e-7)
        assert n * world == B


def test_one_process_distributed_losses_are_the_plain_ones():
    image, text = embeddings(3)
    t, b = torch.tensor([1.1]), torch.tensor([-4.0])
    assert torch.equal(ring_siglip_loss(image, text, t, b), siglip_loss(image, text, t, b))
    assert torch.equal(gathered_clip_loss(image, text, t), clip_loss(image, text, t))
