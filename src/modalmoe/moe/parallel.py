"""Expert parallelism: shard an MoE layer's experts over the ranks of a process group.

With expert-parallel size P, rank r of the group holds experts ``[r*E/P, (r+1)*E/P)``; the
router and everything else stay replicated. Each rank routes its own tokens, then
``ShardedExpertBank`` sends every (token, expert) row to the rank that owns the expert with
an autograd-aware ``all_to_all_single`` (``torch.distributed.nn.functional``; gloo runs it on
CPU), runs its local experts with the same grouped kernel as ``ExpertBank``, and sends the
results back in the original order, where the layer combines them with the gate weights.
Backward runs the two exchanges in reverse (their autograd functions do).

``ShardedExpertBank`` has ``ExpertBank``'s call signature, so ``MoELayer`` and the dispatch
functions run unchanged: ``shard_experts(model, group)`` swaps the bank of every MoE layer in
place. Token-choice (dropless or with a capacity), expert-choice, communication and soft MoE
all reach the experts through that one call and work. A sharded layer computes exactly what
the unsharded layer computes on each rank's own tokens.

Wire volume of one MoE layer, per rank and step (the cost model; ``benchmarks/expert_parallel.py``
measures it). ``T`` tokens on the rank, ``k`` kept choices per token, width ``D``, ``b``
bytes per element, expert-parallel size ``P``; a row bound for an expert on the same rank
does not cross the wire, which under uniform routing leaves a fraction ``(P-1)/P``::

    forward  = dispatch + combine = 2 * T * k * D * b * (P-1)/P
    backward = the same two exchanges, reversed   = 2 * T * k * D * b * (P-1)/P
    step     = 4 * T * k * D * b * (P-1)/P        (+ E * 8 bytes of split counts per forward)

``exchange_volume(counts, ...)`` gives the exact figure for measured split sizes.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn

from modalmoe.moe.experts import ExpertBank, GroupedLayout, _check_activation, grouped_ffn
from modalmoe.moe.layer import MoELayer


def _all_to_all(x: Tensor, recv_splits: list[int], send_splits: list[int], group) -> Tensor:
    """Autograd-aware variable-size all-to-all of rows (``x`` [sum(send_splits), D])."""
    out = x.new_empty(sum(recv_splits), x.shape[-1])
    with warnings.catch_warnings():
        # torch 2.13 marks the autograd collectives deprecated in favour of the functional ones,
        # which have no autograd support on gloo; this one is documented and works.
        warnings.simplefilter("ignore", FutureWarning)
        return dist_nn.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)


def exchange_volume(send_counts: Tensor, rank: int, row_bytes: int) -> int:
    """Bytes this rank puts on the wire in one exchange: rows for other ranks times row size.

    Args:
        send_counts: [P] rows this rank sends to each rank of the group (its own share stays local).
        rank: this rank's index in the group.
        row_bytes: ``D * dtype bytes``.
    """
    return int(send_counts.sum() - send_counts[rank]) * row_bytes


def predicted_volume(tokens: int, dim: int, k: int, parallel_size: int, dtype_bytes: int) -> float:
    """The cost model: bytes one rank sends per MoE layer per training step (forward and
    backward) under uniform routing, ``4 * T * k * D * b * (P-1)/P``."""
    return 4 * tokens * k * dim * dtype_bytes * (parallel_size - 1) / parallel_size


class ShardedExpertBank(nn.Module):
    """This rank's slice of an expert bank, with ``ExpertBank``'s call signature.

    Holds ``w_in`` [E/P, D, F'] and ``w_out`` [E/P, F, D] for experts
    ``[rank*E/P, (rank+1)*E/P)`` of the group. ``num_experts`` is the global E, so routers,
    dispatch and records see the unsharded layer.

    Args:
        bank: the full bank to take this rank's experts from (its weights are copied).
        group: the expert-parallel process group (None: the default group).
    """

    def __init__(self, bank: ExpertBank, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        _check_activation(bank.activation)
        if not dist.is_initialized():
            raise RuntimeError(
                "expert parallelism needs torch.distributed: call torch.distributed.init_process_group "
                "first (or launch with torchrun)"
            )
        self.group = group
        self.parallel_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if bank.num_experts % self.parallel_size:
            raise ValueError(
                f"{bank.num_experts} experts cannot be split evenly over expert-parallel size "
                f"{self.parallel_size}; make num_experts a multiple of it"
            )
        self.num_experts, self.dim, self.hidden, self.activation = (
            bank.num_experts,
            bank.dim,
            bank.hidden,
            bank.activation,
        )
        self.local_experts = bank.num_experts // self.parallel_size
        self.first = self.rank * self.local_experts
        local = slice(self.first, self.first + self.local_experts)
        self.w_in = nn.Parameter(bank.w_in.detach()[local].clone())
        self.w_out = nn.Parameter(bank.w_out.detach()[local].clone())

    def forward(
        self, x: Tensor, layout: GroupedLayout, gate: Tensor | None = None, index: Tensor | None = None
    ) -> Tensor:
        """Same contract as ``ExpertBank.forward``.

        Args:
            x: [A, D] rows sorted by global expert, or [T, D] tokens with ``index``.
            layout: over all E experts (``layout.counts[e]`` rows for global expert e).
            gate: [A] weight of each row's output (None: 1).
            index: [A] token of each sorted row (None: ``x`` is already sorted).

        Returns:
            [A, D] expert outputs in the sorted row order.
        """
        if layout.num_experts != self.num_experts:
            raise ValueError(f"layout has {layout.num_experts} experts, the sharded bank {self.num_experts}")
        rows = x if index is None else x.index_select(0, index)
        size, local = self.parallel_size, self.local_experts
        # Rows are sorted by global expert, hence by owning rank: split sizes are sums of counts.
        send = torch.tensor(layout.counts, dtype=torch.int64, device=x.device).view(size, local)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv.view(-1), send.view(-1), group=self.group)  # recv[s, e]: from s for e
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        received = _all_to_all(rows, recv_splits, send_splits, self.group)  # ordered by (source, expert)
        # The kernel wants rows grouped by local expert: a stable sort by expert keeps sources in order.
        expert_of = torch.arange(local, device=x.device).repeat(size).repeat_interleave(recv.view(-1))
        order = torch.sort(expert_of, stable=True).indices
        y = grouped_ffn(
            received, self.w_in, self.w_out, GroupedLayout.plan(recv.sum(0).tolist()), self.activation, index=order
        )
        y = y.new_zeros(y.shape).index_copy(0, order, y)  # back to (source, expert) order
        out = _all_to_all(y, send_splits, recv_splits, self.group)
        return out if gate is None else out * gate.unsqueeze(-1).to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"experts {self.first}..{self.first + self.local_experts - 1} of {self.num_experts} "
            f"(expert-parallel rank {self.rank} of {self.parallel_size}), dim={self.dim}, hidden={self.hidden}, "
            f"activation={self.activation}"
        )


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Swap the expert bank of every ``MoELayer`` in ``model`` for this rank's shard, in place.

    Call it on every rank of ``group`` with identically initialised models (same seed), so
    that the shards together are the original banks.

    Args:
        model: any module holding ``MoELayer``s.
        group: the expert-parallel process group (None: the default group).

    Returns:
        The number of layers sharded.
    """
    count = 0
    for layer in model.modules():
        if isinstance(layer, MoELayer) and isinstance(layer.experts, ExpertBank):
            layer.experts = ShardedExpertBank(layer.experts, group)
            count += 1
    return count


def sharded_banks(module: nn.Module) -> dict[str, ShardedExpertBank]:
    """Qualified name -> ``ShardedExpertBank`` for every sharded bank in ``module``."""
    return {name: m for name, m in module.named_modules() if isinstance(m, ShardedExpertBank)}


def expert_keys(module: nn.Module) -> dict[str, ShardedExpertBank]:
    """``state_dict`` key -> owning bank for every sharded expert weight in ``module``."""
    return {
        f"{name}.{param}" if name else param: bank
        for name, bank in sharded_banks(module).items()
        for param in ("w_in", "w_out")
    }


def gather_experts(local: Tensor, bank: ShardedExpertBank) -> Tensor:
    """[E/P, ...] shard of this rank -> [E, ...] full tensor, on every rank of the bank's group
    (a collective: every rank of the group must call it)."""
    parts = [torch.empty_like(local) for _ in range(bank.parallel_size)]
    dist.all_gather(parts, local.detach().contiguous(), group=bank.group)
    return torch.cat(parts)


def shard_of(full: Tensor, bank: ShardedExpertBank, what: str = "tensor") -> Tensor:
    """[E, ...] full tensor -> this rank's [E/P, ...] rows."""
    if full.shape[0] != bank.num_experts:
        raise ValueError(f"{what} has {full.shape[0]} experts on its first dim, the model {bank.num_experts}")
    return full[bank.first : bank.first + bank.local_experts].clone()
