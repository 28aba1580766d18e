"""The inner loop: AdamW steps on one machine, FSDP2 across its local ranks.

Plain PyTorch. DiLoCo only sees the parameters at round boundaries, through
`export_params` / `import_params`, which hide whether the model is sharded.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor

from p2p_trainer.config import InnerConfig
from p2p_trainer.schedule import wsd_factor


@dataclass
class StepStats:
    loss: float
    lr: float
    tokens: int
    grad_norm: float


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) for this process; starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def apply_fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """Shard each decoder block, then the root (embeddings, final norm, head), over all ranks."""
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def _autocast_dtype(cfg: InnerConfig, device: torch.device) -> torch.dtype | None:
    if cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def causal_lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, plain cross-entropy to report); z-loss keeps the softmax normaliser near 1."""
    logits = logits.float().flatten(0, 1)
    ce = F.cross_entropy(logits, targets.flatten())
    if not z_loss:
        return ce, ce
    return ce + z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean(), ce


class InnerLoop:
    """AdamW + WSD + clipping + z-loss + accumulation over one peer's batch, split across local ranks."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: InnerConfig,
        micro_batch_size: int,
        *,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str = "cpu",
    ):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = torch.device(device)
        self.micro_batch_size = micro_batch_size
        self.model = apply_fsdp(model) if world > 1 else model
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.step_count = 0
        self._autocast = _autocast_dtype(cfg, self.device)

    def lr(self) -> float:
        return self.cfg.lr * wsd_factor(self.step_count, self.cfg)

    def _forward_loss(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = (
            torch.autocast(self.device.type, dtype=self._autocast)
            if self._autocast
            else contextlib.nullcontext()
        )
        with ctx:
            logits = self.model(input_ids=tokens[:, :-1]).logits
        return causal_lm_loss(logits, tokens[:, 1:], self.cfg.z_loss)

    def step(self, batch: torch.Tensor) -> StepStats:
        """One optimizer step on the peer's batch [B, T+1]; each rank takes B/world rows, in micro-batches."""
        self.model.train()
        rows = self._my_rows(batch)
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        reported = torch.zeros((), device=self.device)
        for tokens in rows.split(self.micro_batch_size):
            share = len(tokens) / len(rows)  # a short last micro-batch weighs less
            loss, ce = self._forward_loss(tokens.to(self.device, non_blocking=True))
            (loss * share).backward()
            reported += ce.detach() * share
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        if self.world > 1:
            dist.all_reduce(reported, op=dist.ReduceOp.AVG)
        return StepStats(loss=reported.item(), lr=lr, tokens=batch[:, 1:].numel(), grad_norm=grad_norm)

    def _my_rows(self, batch: torch.Tensor) -> torch.Tensor:
        if len(batch) % self.world:
            raise ValueError(f"batch of {len(batch)} sequences does not split evenly over {self.world} ranks")
        return batch.chunk(self.world)[self.rank]

    def _clip(self) -> float:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor]) -> float:
        """Mean held-out cross-entropy (nats per token) over the given batches, split across ranks."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for tokens in batches:
            for micro in self._my_rows(tokens).split(self.micro_batch_size):
                total += self._forward_loss(micro.to(self.device))[1] * len(micro) / len(tokens)
        if self.world > 1:
            dist.all_reduce(total)
        return total.item() / len(batches)

    @torch.no_grad()
    def export_params(self) -> torch.Tensor:
        """All parameters as one flat fp32 CPU vector in `named_parameters` order (collective under FSDP)."""
        parts = []
        for p in self.model.parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            parts.append(full.detach().float().reshape(-1).cpu())
        return torch.cat(parts)

    @torch.no_grad()
    def import_params(self, flat: torch.Tensor | None) -> None:
        """Load a flat vector (rank 0's; other ranks may pass None) into the possibly sharded model."""
        if self.world > 1:
            if flat is None:
                flat = torch.empty(sum(p.numel() for p in self.model.parameters()))
            comm = flat.to(self.device) if self.device.type == "cuda" else flat
            dist.broadcast(comm, src=0)
            flat = comm.cpu()
        offset = 0
        for p in self.model.parameters():
            chunk = flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
            if isinstance(p, DTensor):
                local = distribute_tensor(chunk.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(local.to_local())
            else:
                p.copy_(chunk)
        if offset != flat.numel():
            raise ValueError(f"parameter vector has {flat.numel()} values, the model {offset}")

    def reset_optimizer(self) -> None:
        """Forget the AdamW moments (e.g. after they turned non-finite); the schedule position stays."""
        self.optimizer.state.clear()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
