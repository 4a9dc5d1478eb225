"""Data- and expert-parallel training with ``torch.distributed`` (launched by torchrun).

    torchrun --nproc-per-node 2 -m modalmoe train tiny/token-choice --set distributed.expert_parallel_size=2

``setup_parallel`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``), initialises the default process group (gloo on CPU, nccl with
CUDA) and returns a ``Parallel`` that the trainer asks at each point where a distributed run
differs from a single process. Without torchrun it is a no-op and the trainer runs as before.

How the work is split (``W`` ranks, expert-parallel size ``P``):

- **Data**: every rank draws the same seeded epoch order; rank r takes its contiguous slice of
  each global batch (``tensor_split``), so the global batch of a step is the single-process
  batch. A rank's loss is a mean over its slice; it is scaled by ``n_r * W / n`` so that the
  average over ranks is the mean over the global batch even when the last batch does not split
  evenly. Router aux losses are computed per rank, on the rank's tokens (as in GShard and
  every expert-parallel engine), so with aux weights > 0 a run matches a single process only
  up to that difference.
- **Experts**: with ``P > 1`` the ranks form ``W / P`` expert-parallel groups of ``P``
  consecutive ranks (one node's ranks, for multi-node runs, keep the all-to-all local); rank r
  of a group holds experts ``[r*E/P, (r+1)*E/P)`` (``modalmoe.moe.parallel``).
- **Gradients**: the model is wrapped in ``DistributedDataParallel`` (``find_unused_parameters``:
  which parameters a step uses depends on the modalities present and, for some objectives, on
  extra forward passes), with the sharded expert weights excluded, since they differ per rank
  and DDP would average them into nonsense. DDP averages the other gradients over all W ranks.
  After backward, ``sync_gradients`` handles what DDP does not see: the objectives' own
  parameters (averaged over W) and the expert weights. An expert's gradient on its owner
  already sums the contributions of all P ranks of its group (the all-to-all's backward
  brings them home), so it is summed over the ``W / P`` ranks that hold the same experts
  and divided by W, which is the gradient of the global mean loss.
- **Metrics**: train-loss terms are averaged over ranks weighted by their samples; every rank
  validates on the full validation split (an expert-parallel forward needs every rank of the
  group) and rank 0's metrics are broadcast so that early stopping decides the same everywhere.
- **Files**: rank 0 writes the log, config and checkpoints. A checkpoint is always the
  ordinary single-process file: sharded expert weights and their AdamW moments are gathered
  to full ``[E, ...]`` tensors before rank 0 writes, and sliced again on load, so a run can be
  resumed, evaluated or served at any world size, a single process included.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from modalmoe.checkpoint import _MODEL, _OPTIM, Checkpoint, restore_training, save_checkpoint
from modalmoe.config import ExperimentConfig
from modalmoe.moe.balance import balance_keys
from modalmoe.moe.parallel import ShardedExpertBank, expert_keys, gather_experts, shard_experts, shard_of


class DistributedError(RuntimeError):
    """A distributed setup that cannot work; the message says what to change."""


def torchrun_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


@dataclass
class Parallel:
    """Where this process stands in a distributed run (a single process by default).

    Attributes:
        rank, world_size: in the default group.
        expert_parallel_size: P, ranks sharing one copy of the experts.
        expert_group: this rank's expert-parallel group (P consecutive ranks), or None.
        replica_group: the ranks that hold the same experts as this one, or None.
        owns_group: this object initialised the default group and destroys it in ``close``.
    """

    rank: int = 0
    world_size: int = 1
    expert_parallel_size: int = 1
    expert_group: Any = None
    replica_group: Any = None
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, prints and writes files."""
        return self.rank == 0

    # --- model ----------------------------------------------------------------------------

    def prepare(self, model: nn.Module) -> nn.Module:
        """Shard the experts (P > 1) and wrap ``model`` for data parallelism.

        Returns:
            The module to run forward passes through (DDP, or ``model`` itself). ``model``
            keeps its parameters: build the optimizer over it after this call.
        """
        if self.expert_parallel_size > 1 and not shard_experts(model, self.expert_group):
            raise DistributedError(
                f"distributed.expert_parallel_size={self.expert_parallel_size} but the model has no MoE layer "
                "to shard; set model.moe.every >= 1 or distributed.expert_parallel_size=1"
            )
        if not self.active:
            return model
        # Sharded experts, and the load-balancing buffers each rank counts on its own
        # (DDP would broadcast rank 0's over them at every forward).
        ignore = [*expert_keys(model), *balance_keys(model)]
        if ignore:
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        device = next(model.parameters()).device
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    # --- data -----------------------------------------------------------------------------

    def shard(self, rows: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch's sample indices."""
        if not self.active:
            return rows
        if len(rows) < self.world_size:
            raise DistributedError(
                f"a batch of {len(rows)} samples cannot be split over {self.world_size} ranks; "
                "raise train.batch_size or use fewer processes"
            )
        return torch.tensor_split(rows, self.world_size)[self.rank]

    def loss_scale(self, rows: Tensor) -> float:
        """``n_r * W / n``: makes the mean over ranks of per-rank mean losses the global mean."""
        return len(self.shard(rows)) * self.world_size / len(rows) if self.active else 1.0

    def reduce_terms(self, terms: dict[str, float], rows: Tensor) -> dict[str, float]:
        """Per-rank loss terms -> their sample-weighted mean over ranks (on every rank)."""
        if not self.active:
            return terms
        weight = len(self.shard(rows))
        names = sorted(terms)
        values = torch.tensor([terms[n] * weight for n in names] + [weight], dtype=torch.float64)
        dist.all_reduce(values)
        return {n: float(v / values[-1]) for n, v in zip(names, values[:-1], strict=True)}

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any JSON-like object) on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # --- gradients ------------------------------------------------------------------------

    def sync_gradients(self, module: nn.Module, ddp_model: nn.Module) -> None:
        """After backward: average the gradients DDP did not (parameters outside ``ddp_model``
        such as the objectives' own) over all ranks, and sum the sharded experts' over the
        ranks holding the same experts, divided by W (see the module docstring)."""
        if not self.active:
            return
        inner = ddp_model.module if isinstance(ddp_model, nn.parallel.DistributedDataParallel) else ddp_model
        covered = {id(p) for p in inner.parameters()}
        experts = {id(p) for m in module.modules() if isinstance(m, ShardedExpertBank) for p in m.parameters()}
        others = [p for p in module.parameters() if p.requires_grad and id(p) not in covered]
        expert = [p for p in module.parameters() if p.requires_grad and id(p) in experts]
        _all_reduce_grads(others, None, self.world_size)
        _all_reduce_grads(expert, self.replica_group, self.world_size)

    def clip_grad_norm_(self, module: nn.Module, max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole (sharded) model: the expert
        shards' squared norms are summed over the expert-parallel group, so every rank
        clips by the norm of the full model's gradient."""
        if self.expert_parallel_size == 1:
            return torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
        experts = {id(p) for m in module.modules() if isinstance(m, ShardedExpertBank) for p in m.parameters()}
        grads = [(p.grad, id(p) in experts) for p in module.parameters() if p.grad is not None]
        dense = sum((g.detach().double().pow(2).sum() for g, e in grads if not e), torch.zeros((), dtype=torch.float64))
        sharded = sum((g.detach().double().pow(2).sum() for g, e in grads if e), torch.zeros((), dtype=torch.float64))
        dist.all_reduce(sharded, group=self.expert_group)
        total = (dense + sharded).sqrt().float()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g, _ in grads:
            g.mul_(coef.to(g.device, g.dtype))
        return total

    # --- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self, path, *, module: nn.Module, optimizer=None, **kw) -> None:
        """Gather sharded experts (a collective: every rank calls this), then rank 0 writes
        an ordinary checkpoint that loads at any world size; returns when it is on disk."""
        if not self.active:
            save_checkpoint(path, module=module, optimizer=optimizer, **kw)
            return
        state = module.state_dict()
        for key, bank in expert_keys(module).items():
            state[key] = gather_experts(state[key], bank)
        optimizer_state = None if optimizer is None else self._gather_optimizer(module, optimizer)
        if self.is_main:
            save_checkpoint(
                path, module=module, optimizer=optimizer, state=state, optimizer_state=optimizer_state, **kw
            )
        dist.barrier()

    def _expert_params(self, module: nn.Module, optimizer) -> dict[int, ShardedExpertBank]:
        """Optimizer state index -> bank, for the sharded expert weights."""
        owner = {
            id(p): bank for bank in module.modules() if isinstance(bank, ShardedExpertBank) for p in bank.parameters()
        }
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {i: owner[id(p)] for i, p in enumerate(params) if id(p) in owner}

    def _gather_optimizer(self, module: nn.Module, optimizer) -> dict:
        state = optimizer.state_dict()
        banks = self._expert_params(module, optimizer)
        entries = {}
        for index, values in state["state"].items():
            bank = banks.get(index)
            entries[index] = {
                name: gather_experts(v, bank) if bank is not None and isinstance(v, Tensor) and v.dim() else v
                for name, v in values.items()
            }
        return {**state, "state": entries}

    def restore_training(self, checkpoint: Checkpoint, *, module: nn.Module, optimizer, scheduler) -> None:
        """``checkpoint.restore_training`` with full expert tensors sliced to this rank's shard."""
        if self.expert_parallel_size == 1:
            restore_training(checkpoint, module=module, optimizer=optimizer, scheduler=scheduler)
            return
        tensors = dict(checkpoint.tensors)
        for key, bank in expert_keys(module).items():
            tensors[_MODEL + key] = shard_of(tensors[_MODEL + key], bank, f"checkpoint entry {key!r}")
        for index, bank in self._expert_params(module, optimizer).items():
            prefix = f"{_OPTIM}{index}/"
            for key in [k for k in tensors if k.startswith(prefix) and tensors[k].dim()]:
                tensors[key] = shard_of(tensors[key], bank, f"checkpoint entry {key!r}")
        restore_training(
            dataclasses.replace(checkpoint, tensors=tensors), module=module, optimizer=optimizer, scheduler=scheduler
        )

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if ``setup_parallel`` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def shard_state(module: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """A full (single-process) ``state_dict`` -> the one of ``module`` with sharded experts:
    every sharded expert weight is sliced to this rank's experts."""
    out = dict(state)
    for key, bank in expert_keys(module).items():
        out[key] = shard_of(state[key], bank, f"state entry {key!r}")
    return out


def _all_reduce_grads(params: list[nn.Parameter], group, divisor: int) -> None:
    """Sum the gradients of ``params`` over ``group`` and divide by ``divisor``. A gradient that
    is None on some ranks counts as 0 there; one that is None on every rank stays None."""
    if not params:
        return
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(used, op=dist.ReduceOp.MAX, group=group)
    params = [p for p, u in zip(params, used.tolist(), strict=True) if u]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= divisor
    for p, piece in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = piece.view_as(p).clone()


def setup_parallel(config: ExperimentConfig, num_samples: int | None = None) -> Parallel:
    """The ``Parallel`` of this process: initialise the default group under torchrun (unless
    already done), build the expert-parallel groups, and check that the run can be split.

    Args:
        config: the experiment (``distributed.expert_parallel_size``, ``distributed.backend``,
            the batch size and the options that cannot run distributed).
        num_samples: training samples, to check that every batch splits over the ranks.
    """
    size = config.distributed.expert_parallel_size
    world = torchrun_world()
    owns = False
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    elif world is not None and world[1] > 1:
        rank, world_size, local_rank = world
        backend = config.distributed.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            # CUDA tensors over nccl; the CPU-side bookkeeping (losses, metrics) over gloo.
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend)
        owns = True
    else:
        rank, world_size = 0, 1
    if world_size % size:
        raise DistributedError(
            f"distributed.expert_parallel_size={size} does not divide the world size {world_size}; "
            f"launch a multiple of {size} processes (torchrun --nproc-per-node {size} ...) or change it"
        )
    parallel = Parallel(rank=rank, world_size=world_size, expert_parallel_size=size, owns_group=owns)
    if world_size == 1:
        return parallel
    if config.train.ogm.enabled:
        raise DistributedError(
            "train.ogm (OGM-GE) scales each rank's gradients by coefficients from its own batch, which "
            "would make the ranks diverge; disable it (train.ogm.enabled=false) for distributed runs"
        )
    batch = config.train.batch_size
    last = num_samples % batch if num_samples is not None else 0
    if batch < world_size or 0 < last < world_size:
        raise DistributedError(
            f"train.batch_size={batch} over {num_samples} samples leaves a batch of fewer than {world_size} "
            "samples (one per rank is needed); change train.batch_size or the number of processes"
        )
    if size > 1:
        # Every rank must create every group, in the same order (torch.distributed.new_group).
        for start in range(0, world_size, size):
            group = dist.new_group(list(range(start, start + size)))
            if start <= rank < start + size:
                parallel.expert_group = group
        for offset in range(size):
            group = dist.new_group(list(range(offset, world_size, size)))
            if rank % size == offset:
                parallel.replica_group = group
    return parallel


class NullLog:
    """The log of ranks other than 0: writes nothing."""

    def write(self, split: str, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
