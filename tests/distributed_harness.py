"""The distributed loss tests' harness (tests/test_loss.py, tests/test_siglip.py): a worker function run in N gloo
processes on this machine, and the tiny two-tower model whose loss and gradients they compare with one process on
the concatenated global batch."""

import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

LOCAL_BATCH = 3
IN_DIM = 8
EMBED_DIM = 6


class TinyTowers(nn.Module):
    """Two projections, a learnable log-scale and, given `logit_bias`, a learnable bias (SigLIP): enough to check
    every gradient path of a loss. Returns the loss's arguments: `(image_embeds, text_embeds, scale[, bias])`."""

    def __init__(self, logit_bias: float | None = None):
        super().__init__()
        self.image = nn.Linear(IN_DIM, EMBED_DIM)
        self.text = nn.Linear(IN_DIM, EMBED_DIM)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = None if logit_bias is None else nn.Parameter(torch.tensor(logit_bias))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image_embeds = nn.functional.normalize(self.image(images), dim=-1)
        text_embeds = nn.functional.normalize(self.text(texts), dim=-1)
        if self.logit_bias is None:
            return image_embeds, text_embeds, self.logit_scale.exp()
        return image_embeds, text_embeds, self.logit_scale.exp(), self.logit_bias


def global_batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(images, texts)` inputs of `world_size * LOCAL_BATCH` pairs, the same in every process."""
    generator = torch.Generator().manual_seed(0)
    shape = (world_size * LOCAL_BATCH, IN_DIM)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def local_rows(rank: int) -> slice:
    """This rank's pairs of the global batch."""
    return slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)


def make_model(logit_bias: float | None = None) -> TinyTowers:
    """The same weights in every process."""
    torch.manual_seed(1)
    return TinyTowers(logit_bias)


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in model.named_parameters()}


def ddp_loss_and_gradients(
    loss_fn: nn.Module, rank: int, world_size: int, logit_bias: float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step of this rank on its local rows, as DDP runs it (gradients averaged over ranks, exactly as
    accelerate's prepared model does): the mean over ranks of the loss, and the synchronised gradients."""
    images, texts = global_batch(world_size)
    rows = local_rows(rank)
    model = nn.parallel.DistributedDataParallel(make_model(logit_bias))
    loss = loss_fn(*model(images[rows], texts[rows]))
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return mean_loss / world_size, gradients(model.module)


def run_gloo(worker: Callable[[int, int], dict], world_size: int, out_dir: Path) -> list[dict]:
    """`worker(rank, world_size)` in `world_size` processes joined in a gloo process group; each rank's result.

    `worker` must be a module-level function (the processes are spawned, so it travels by name)."""
    mp.spawn(_gloo_process, args=(worker, world_size, _free_port(), str(out_dir)), nprocs=world_size, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]


def _gloo_process(rank: int, worker: Callable[[int, int], dict], world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(worker(rank, world_size), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
