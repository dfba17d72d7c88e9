"""Context parallelism (CP) for packed multimodal rows.

A packed row of several documents is split over the CP group **per document**: every document is
padded to a multiple of 2·CP tokens and cut into 2·CP equal chunks; CP rank r keeps chunks r and
2·CP-1-r of every document (the load-balanced "zig-zag": causal work per rank is then equal). All
per-token tensors (tokens, labels, loss mask, the [3, T] mRoPE positions) are sliced with the same
index, on the token axis. The model embeds the *whole* row first and scatters the image embeddings
into it before slicing, so an image that straddles a chunk border is still right.

Attention over the split sequence is Ulysses-style: an all-to-all turns "my tokens, all heads" into
"all tokens, my heads", each rank runs ordinary varlen attention over every (padded) document, and a
second all-to-all turns it back. Document borders are those of the unsplit row, so no token ever sees
another document, and load balance is automatic. Communication is plain torch.distributed
(gloo on CPU, NCCL on GPU), differentiable, so autograd gives the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams


class ContextParallelError(ValueError):
    """A row or model layout that context parallelism cannot split."""


# ----------------------------------------------------------------------------- padding
def padded_lengths(cu_seqlens: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Per-document lengths rounded up to a multiple of 2·CP."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    multiple = 2 * cp_size
    return (lengths + multiple - 1) // multiple * multiple


@dataclass
class PaddedRow:
    """A packed row whose documents are padded to multiples of 2·CP; pad tokens carry no loss."""

    input_ids: torch.Tensor  # [T_pad]
    position_ids: torch.Tensor  # [3, T_pad]
    labels: torch.Tensor  # [T_pad]
    loss_mask: torch.Tensor  # [T_pad] float
    cu_seqlens: torch.Tensor  # [N+1] int32, padded document borders


def pad_row_for_context_parallel(input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                                 loss_mask: torch.Tensor, cu_seqlens: torch.Tensor, cp_size: int,
                                 pad_token_id: int = 151643) -> PaddedRow:
    """Pad every document at its end. Pad tokens sit after the document's last token, so causal
    attention keeps real tokens from seeing them; their positions continue the document's."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    padded = padded_lengths(cu_seqlens, cp_size)
    total = int(padded.sum())
    new_cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    new_cu[1:] = torch.cumsum(padded, 0)
    # destination of every real token
    doc_of_token = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    offset_in_doc = torch.arange(int(lengths.sum())) - torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    dest = new_cu[:-1].long()[doc_of_token] + offset_in_doc

    out_ids = torch.full((total,), pad_token_id, dtype=input_ids.dtype)
    out_labels = torch.full((total,), pad_token_id, dtype=labels.dtype)
    out_mask = torch.zeros(total, dtype=loss_mask.dtype)
    out_ids[dest], out_labels[dest], out_mask[dest] = input_ids, labels, loss_mask
    # pad positions: the document's last position + 1, 2, ... on all three axes
    out_pos = torch.empty(3, total, dtype=position_ids.dtype)
    out_pos[:, dest] = position_ids
    pad_count = padded - lengths
    if int(pad_count.sum()):
        pad_doc = torch.repeat_interleave(torch.arange(len(lengths)), pad_count)
        pad_rank = torch.arange(int(pad_count.sum())) - torch.repeat_interleave(
            torch.cumsum(pad_count, 0) - pad_count, pad_count)
        pad_dest = new_cu[:-1].long()[pad_doc] + lengths[pad_doc] + pad_rank
        last = torch.zeros(len(lengths), dtype=position_ids.dtype)
        has_tokens = lengths > 0
        last[has_tokens] = position_ids[:, (cu_seqlens[1:].long() - 1)[has_tokens]].max(0).values
        out_pos[:, pad_dest] = (last[pad_doc] + 1 + pad_rank).to(position_ids.dtype)
    return PaddedRow(out_ids, out_pos, out_labels, out_mask, new_cu)


# ----------------------------------------------------------------------------- the split
def zigzag_token_index(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Indices (into the padded row) of the tokens CP rank ``cp_rank`` keeps, in local order:
    for every document, its chunk ``cp_rank`` then its chunk ``2·cp_size-1-cp_rank``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if bool((lengths % (2 * cp_size)).any()):
        bad = [i for i, n in enumerate(lengths.tolist()) if n % (2 * cp_size)]
        raise ContextParallelError(
            f"documents {bad[:10]} have lengths not divisible by 2*CP={2 * cp_size}: pad the row with "
            "pad_row_for_context_parallel (the packer does this when given the CP size)")
    chunk = lengths // (2 * cp_size)
    starts = cu_seqlens[:-1].long()
    first = starts + cp_rank * chunk
    second = starts + (2 * cp_size - 1 - cp_rank) * chunk
    # per document: [first, first + chunk) then [second, second + chunk)
    seg_starts = torch.stack([first, second], 1).reshape(-1)
    seg_lengths = torch.stack([chunk, chunk], 1).reshape(-1)
    within = torch.arange(int(seg_lengths.sum())) - torch.repeat_interleave(
        torch.cumsum(seg_lengths, 0) - seg_lengths, seg_lengths)
    return torch.repeat_interleave(seg_starts, seg_lengths) + within


@dataclass
class ContextParallelPlan:
    """Everything a rank needs to split a padded row and to run attention over the CP group."""

    cp_size: int
    cp_rank: int
    local_index: torch.Tensor  # [T_pad / CP] tokens this rank keeps
    rank_major_to_global: torch.Tensor  # [T_pad]: order of all ranks' local tokens (rank 0 first) -> row order
    global_to_rank_major: torch.Tensor  # inverse permutation
    cu_seqlens: torch.Tensor  # [N+1] int32, padded document borders of the full row
    max_seqlen: int
    group: Optional[dist.ProcessGroup] = field(default=None, repr=False)
    # The row's images are encoded once over the group: rank r encodes images
    # image_splits[r] = [start, end) (pixel rows patch_splits[r]), giving token_counts[r] embeddings.
    image_splits: list[tuple[int, int]] = field(default_factory=list)
    patch_splits: list[tuple[int, int]] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int,
              group: Optional[dist.ProcessGroup] = None, image_grid_thw: Optional[torch.Tensor] = None,
              spatial_merge_size: int = 2) -> "ContextParallelPlan":
        """Host-side (the data loader can precompute it): token split, permutations, image split."""
        cu_seqlens = cu_seqlens.to(torch.int32).cpu()
        parts = [zigzag_token_index(cu_seqlens, cp_size, r) for r in range(cp_size)]
        rank_major = torch.cat(parts)
        inverse = torch.empty_like(rank_major)
        inverse[rank_major] = torch.arange(rank_major.numel())
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if len(cu_seqlens) > 1 else 0
        plan = cls(cp_size, cp_rank, parts[cp_rank], rank_major, inverse, cu_seqlens, max_len, group)
        if image_grid_thw is not None and len(image_grid_thw):
            plan.image_splits, plan.patch_splits, plan.token_counts = split_images(
                image_grid_thw, cp_size, spatial_merge_size)
        return plan

    def to(self, device) -> "ContextParallelPlan":
        return ContextParallelPlan(self.cp_size, self.cp_rank, self.local_index.to(device),
                                   self.rank_major_to_global.to(device), self.global_to_rank_major.to(device),
                                   self.cu_seqlens.to(device), self.max_seqlen, self.group,
                                   self.image_splits, self.patch_splits, self.token_counts)


def split_images(image_grid_thw: torch.Tensor, cp_size: int, spatial_merge_size: int = 2
                 ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[int]]:
    """Contiguous runs of images, one per CP rank, balanced by patch count (the ViT's work).

    Without this every CP rank would encode every page of the row; at 128K tokens the vision tower
    is about a fifth of the step's FLOPs, so replicating it would cost CP-1 times that.
    """
    grid = image_grid_thw.long().cpu()
    patches = (grid[:, 0] * grid[:, 1] * grid[:, 2]).tolist()
    offsets = [0]
    for n in patches:
        offsets.append(offsets[-1] + n)
    total = offsets[-1]
    bounds = [0]
    for rank in range(1, cp_size):  # each cut at the image border nearest to rank/cp of the work
        target = rank * total / cp_size
        candidates = range(bounds[-1], len(offsets))
        bounds.append(min(candidates, key=lambda b: (abs(offsets[b] - target), b)))
    bounds.append(len(patches))
    image_splits = [(bounds[r], bounds[r + 1]) for r in range(cp_size)]
    patch_splits = [(offsets[a], offsets[b]) for a, b in image_splits]
    unit = spatial_merge_size**2
    token_counts = [(pb - pa) // unit for pa, pb in patch_splits]
    return image_splits, patch_splits, token_counts


def gather_image_embeddings(local: torch.Tensor, plan: ContextParallelPlan) -> torch.Tensor:
    """All ranks' image embeddings, in image order, from each rank's own [token_counts[r], H].

    Differentiable: each rank gets back the gradient of the embeddings it produced."""
    longest = max(plan.token_counts)
    padded = torch.nn.functional.pad(local, (0, 0, 0, longest - local.shape[0]))
    parts = _AllGather.apply(padded, plan.group, plan.cp_size)  # [CP, longest, H]
    return torch.cat([part[:count] for part, count in zip(parts, plan.token_counts)])


@dataclass
class ContextParallelPackedSeqParams(PackedSeqParams):
    """Megatron's PackedSeqParams plus our CP plan (attention reads it; Megatron ignores it).

    ``cu_seqlens_q``/``cu_seqlens_kv`` describe the full padded row, as Megatron expects them.
    """

    cp_plan: Optional[ContextParallelPlan] = None


def context_parallel_params(plan: ContextParallelPlan) -> ContextParallelPackedSeqParams:
    return ContextParallelPackedSeqParams(
        qkv_format="thd", cu_seqlens_q=plan.cu_seqlens, cu_seqlens_kv=plan.cu_seqlens,
        max_seqlen_q=plan.max_seqlen, max_seqlen_kv=plan.max_seqlen, cp_group=plan.group, cp_plan=plan)


# ----------------------------------------------------------------------------- communication
class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0; its gradient is the same exchange in reverse."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = torch.empty_like(tensor)
        dist.all_to_all_single(out, tensor.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


class _AllGather(torch.autograd.Function):
    """All-gather of equal-shaped tensors into [world, ...]; the gradient of a rank's input is the
    sum of every rank's gradient for its slot (a reduce-scatter, done as all-to-all + sum, which
    gloo supports and which works on subgroups)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group, world: int) -> torch.Tensor:
        ctx.group = group
        out = tensor.new_empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)
        return out.view((world,) + tuple(tensor.shape))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        received = torch.empty_like(grad)
        dist.all_to_all_single(received, grad.contiguous(), group=ctx.group)
        return received.sum(0), None, None


def _tokens_to_heads(x: torch.Tensor, plan: ContextParallelPlan) -> torch.Tensor:
    """[T_loc, H, D] (my tokens, all heads) -> [T_pad, H / CP, D] (all tokens in row order, my heads)."""
    t_loc, heads, dim = x.shape
    cp = plan.cp_size
    # rank r receives head block r: put head blocks on the leading (exchanged) axis
    send = x.reshape(t_loc, cp, heads // cp, dim).transpose(0, 1).reshape(cp * t_loc, heads // cp, dim)
    received = _AllToAll.apply(send, plan.group)  # [CP * T_loc, H/CP, D], source rank major
    return received.index_select(0, plan.global_to_rank_major)


def _heads_to_tokens(x: torch.Tensor, plan: ContextParallelPlan) -> torch.Tensor:
    """Inverse of ``_tokens_to_heads``: [T_pad, H / CP, D] -> [T_loc, H, D]."""
    total, heads_local, dim = x.shape
    cp = plan.cp_size
    send = x.index_select(0, plan.rank_major_to_global)  # rank-major: block r goes back to rank r
    received = _AllToAll.apply(send, plan.group)  # [CP * T_loc, H/CP, D], head block major
    t_loc = total // cp
    return received.reshape(cp, t_loc, heads_local, dim).transpose(0, 1).reshape(t_loc, cp * heads_local, dim)


def check_heads(num_heads: int, num_kv_heads: int, cp_size: int) -> int:
    """How many times to replicate KV heads so both head counts split over CP (error if impossible)."""
    if num_heads % cp_size:
        raise ContextParallelError(
            f"Ulysses context parallelism splits attention heads: {num_heads} query heads per TP rank "
            f"do not divide by CP={cp_size} (use a TP x CP layout where they do)")
    if num_kv_heads % cp_size == 0:
        return 1
    repeat = cp_size // num_kv_heads if cp_size % num_kv_heads == 0 else 0
    if not repeat or (num_heads // num_kv_heads) % repeat:
        raise ContextParallelError(
            f"{num_kv_heads} KV heads per TP rank cannot be spread over CP={cp_size}")
    return repeat


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ContextParallelPlan,
                      attention_fn) -> torch.Tensor:
    """Exact causal attention over the CP-split row. q [T_loc, Hq, D], k/v [T_loc, Hkv, D]."""
    repeat = check_heads(q.shape[1], k.shape[1], plan.cp_size)
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    qh, kh, vh = (_tokens_to_heads(t, plan) for t in (q, k, v))
    out = attention_fn(qh, kh, vh, plan.cu_seqlens.to(q.device), plan.max_seqlen)
    return _heads_to_tokens(out, plan)


def all_reduce_grads(model: torch.nn.Module, group: Optional[dist.ProcessGroup]) -> None:
    """Sum gradients over the CP group (each rank's are partial: only its tokens' loss)."""
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)
