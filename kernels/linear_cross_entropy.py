"""Fused linear cross-entropy: LM head matmul + cross-entropy in row chunks; the [N, V] logits never exist.

`linear_cross_entropy_sum(hidden [N, H], weight [V, H], labels [N])` returns the summed cross-entropy (fp32) of
`hidden @ weight.T` against `labels`, Liger-kernel style:

- Rows are processed in chunks of C rows (default: C x V ~ 2^27 logits, 256 MiB in bf16; 1,024 rows at a 128k
  vocabulary). Per chunk: logits = x_c W^T (cuBLAS, fp32 accumulation, stored in the compute dtype), a Triton
  pass for the row statistics (online max and sum of exponentials over the real vocabulary columns, target
  logit) in fp32, then a Triton pass that overwrites the logits in place with the gradient
  softmax - one_hot, and two GEMMs: dX_c = G W and dW += G^T x_c. The chunk buffer is reused.
- The gradients are computed during the forward (the loss is a sum, so they are linear in the incoming scalar
  gradient) and only scaled in the backward: peak memory is one chunk of logits plus dX [N, H] and dW (the weight
  gradient, which any LM head has), instead of [N, V] logits, their fp32 copy and the softmax saved for the
  backward (at N = 8192, V = 128k: 2 + 4 + 4 GiB).
- Padded vocabulary rows (global column >= `real_vocab_size`, the engine's convention in engine/model/losses.py)
  are skipped by the statistics (as if masked to -inf) and get exactly zero gradient.
- Vocabulary-parallel TP (`group`): `weight` is this rank's [V/tp, H] shard holding global columns
  [vocab_start, vocab_start + V/tp). Per chunk the ranks combine their partial statistics with the reductions of
  the engine's vocabulary-parallel cross-entropy: an all-reduce MAX of the row max, then an all-reduce SUM of the
  sums of exponentials (rescaled to the global max) and of the target logit (owned by one rank), the two SUMs in
  one [2, C] call. Same volume as the unfused version's [N]-vector all-reduces, spread over chunks. `hidden` is
  replicated over the group and its gradient (a partial sum per rank) is all-reduced in the backward, as
  ColwiseParallel's input does.
- dW accumulates over chunks in the weight's dtype (fp32 master weights under autocast: fp32, via cuBLAS's
  fp32-output GEMM on CUDA). With bf16 weights it accumulates in bf16, as Liger does (one rounding per chunk).

`linear_cross_entropy_reference` is the pure-torch reference (materialises the logits).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl
from chrysalis_kernels.runtime import INTERPRET, check_tensors, next_power_of_2

IGNORE_INDEX = -100
_CHUNK_LOGITS = 1 << 27


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   real_vocab_size: int | None = None,
                                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """sum of cross-entropy(hidden @ weight.T, labels) in fp32, padded columns (>= real_vocab_size) at -inf."""
    logits = (hidden @ weight.t()).float()
    if real_vocab_size is not None and real_vocab_size < logits.shape[-1]:
        logits[:, real_vocab_size:] = float("-inf")
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=ignore_index)


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _ce_stats_kernel(LOGITS, LABELS, MAX, SUMEXP, TARGET, stride_l, n_rows, n_real, vocab_start, ignore_index,
                     BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """Per row over the real local columns [0, n_real): online max, sum exp(x - max), and the target logit."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = LOGITS + rows.to(tl.int64)[:, None] * stride_l
    m = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32) - 1.0e30  # per-lane running max (finite: no NaN when empty)
    s = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    for c0 in range(0, n_real, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(base + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < n_real),
                    other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    row_max = tl.max(m, axis=1)
    row_sum = tl.sum(s * tl.exp(m - row_max[:, None]), axis=1)
    label = tl.load(LABELS + rows, mask=row_ok, other=ignore_index)
    local = label - vocab_start
    owned = row_ok & (label != ignore_index) & (local >= 0) & (local < n_real)
    target = tl.load(LOGITS + rows.to(tl.int64) * stride_l + tl.where(owned, local, 0), mask=owned,
                     other=0.0).to(tl.float32)
    tl.store(MAX + rows, row_max, mask=row_ok)
    tl.store(SUMEXP + rows, row_sum, mask=row_ok)
    tl.store(TARGET + rows, tl.where(owned, target, 0.0), mask=row_ok)


@triton.jit
def _ce_grad_kernel(LOGITS, LABELS, LSE, stride_l, n_rows, n_cols, n_real, vocab_start, ignore_index,
                    BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """In place: logits -> softmax - one_hot(label) on real columns, 0 on padding columns and ignored rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    label = tl.load(LABELS + rows, mask=row_ok, other=ignore_index)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    keep = tl.where(label != ignore_index, 1.0, 0.0)
    local = label - vocab_start
    base = LOGITS + rows.to(tl.int64)[:, None] * stride_l
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        g = tl.where(cols[None, :] < n_real, tl.exp(x - lse[:, None]), 0.0) \
            - tl.where(cols[None, :] == local[:, None], 1.0, 0.0)
        tl.store(base + cols[None, :], (g * keep[:, None]).to(LOGITS.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------------------------ host side
def _block(n_cols: int) -> int:
    return min(4096 if INTERPRET else 1024, max(16, next_power_of_2(n_cols)))


# Rows per program: two on a GPU (rows of a 128k vocabulary are plenty of work; [2, 1024] fp32 tiles keep the
# registers low); 16 under the interpreter, whose cost is per operation, not per element.
_BLOCK_R = 16 if INTERPRET else 2


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_FP32_OUT_GEMM = [True]  # cleared if this torch/cuBLAS rejects addmm(out_dtype=...) in place


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with acc possibly wider (fp32) than a and b (bf16)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _FP32_OUT_GEMM[0]:  # pragma: no cover - GPU: bf16 x bf16 -> fp32, no [V, H] temporary
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _FP32_OUT_GEMM[0] = False
    acc.add_(a @ b)  # a temporary [V, H] in a's dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, real_vocab_size, vocab_start, group, chunk_rows, ignore_index):
        n, h = hidden.shape
        local_vocab = weight.shape[0]
        n_real = local_vocab if real_vocab_size is None else max(0, min(local_vocab, real_vocab_size - vocab_start))
        dtype = _compute_dtype(hidden)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            x = hidden.to(dtype)
            w = weight.to(dtype)
            dx = torch.empty(n, h, dtype=dtype, device=hidden.device) if need_x else None
            dw = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            chunk = chunk_rows or max(1, min(n, _CHUNK_LOGITS // max(1, local_vocab)))
            block = _block(local_vocab)
            for r0 in range(0, n, chunk):
                r1 = min(n, r0 + chunk)
                rows = r1 - r0
                x_c, labels_c = x[r0:r1], labels[r0:r1]
                logits = x_c @ w.t()  # [C, V_local], compute dtype, fp32 accumulation
                row_max = torch.empty(rows, dtype=torch.float32, device=hidden.device)
                sum_exp = torch.empty_like(row_max)
                target = torch.empty_like(row_max)
                grid = (triton.cdiv(rows, _BLOCK_R),)
                _ce_stats_kernel[grid](logits, labels_c, row_max, sum_exp, target, logits.stride(0), rows, n_real,
                                       vocab_start, ignore_index, BLOCK_R=_BLOCK_R, BLOCK=block)
                if group is not None:
                    global_max = row_max.clone()
                    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
                    sums = torch.stack([sum_exp * torch.exp(row_max - global_max), target])  # [2, C]
                    dist.all_reduce(sums, group=group)
                    row_max, sum_exp, target = global_max, sums[0], sums[1]
                lse = row_max + torch.log(sum_exp)
                valid = labels_c != ignore_index
                total += torch.where(valid, lse - target, torch.zeros_like(lse)).sum()
                if need_x or need_w:
                    _ce_grad_kernel[grid](logits, labels_c, lse.contiguous(), logits.stride(0), rows, local_vocab,
                                          n_real, vocab_start, ignore_index, BLOCK_R=_BLOCK_R, BLOCK=block)
                    if need_x:
                        torch.mm(logits, w, out=dx[r0:r1])
                    if need_w:
                        _accumulate_mm(dw, logits.t(), x_c)
                del logits
        ctx.save_for_backward(dx, dw)
        ctx.group, ctx.x_dtype = group, hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        dx, dw = ctx.saved_tensors
        if dx is not None:
            if ctx.group is not None:  # each rank holds the partial sum over its vocabulary slice
                dist.all_reduce(dx, group=ctx.group)
            dx = (dx * grad_out.to(dx.dtype)).to(ctx.x_dtype)
        if dw is not None:
            dw = dw * grad_out.to(dw.dtype)
        return dx, dw, None, None, None, None, None, None


def _check_labels(labels: torch.Tensor, local_vocab: int, real_vocab_size: int | None,
                  group: dist.ProcessGroup | None, ignore_index: int) -> None:
    """Refuses labels outside [0, vocabulary) (the real one: padding columns are not tokens), other than
    `ignore_index`. The kernels read a label only to find its target logit, so such a label was silently scored as a
    target logit of 0 (where F.cross_entropy raises, or gives inf for a padding column).

    On CUDA the check is a device-side assert (`torch._assert_async`, like F.cross_entropy's own): no host sync in
    the training step, the error surfaces at the next synchronisation with this message. Elsewhere a ValueError
    naming the count and the first bad id."""
    vocab = real_vocab_size if real_vocab_size is not None else \
        local_vocab * (dist.get_world_size(group) if group is not None else 1)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.is_cuda:
        torch._assert_async(~bad.any(), f"label(s) outside the vocabulary [0, {vocab}); only ignore_index "
                            f"({ignore_index}) may lie outside it: do the tokenizer and --vocab-size match?")
        return
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(f"{int(bad.sum())} label(s) outside the vocabulary [0, {vocab}) (first: {first}); only "
                         f"ignore_index ({ignore_index}) may lie outside it: do the tokenizer and --vocab-size match?")


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             real_vocab_size: int | None = None, vocab_start: int = 0,
                             group: dist.ProcessGroup | None = None, chunk_rows: int | None = None,
                             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `labels`, without materialising the logits.

    Args:
        hidden: [N, H] (bf16/fp16/fp32; under autocast the GEMMs run in the autocast dtype).
        weight: [V_local, H] LM head (this rank's vocabulary shard under TP).
        labels: [N] global token ids in [0, real vocabulary); `ignore_index` rows contribute nothing; any other id
            raises ValueError.
        real_vocab_size: global columns >= this are padding (excluded, zero gradient). None: no padding.
        vocab_start: the first global column of `weight` (TP rank * V_local).
        group: the vocabulary-parallel process group, or None on one device.
        chunk_rows: rows per chunk (default: ~2^27 logits per chunk).
    Returns:
        fp32 scalar (the same on every rank of `group`); differentiable in hidden and weight.
    """
    check_tensors("chrysalis_kernels.linear_cross_entropy", hidden, weight, labels)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [N, H] and [V, H]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [{hidden.shape[0]}]")
    if chunk_rows is not None and chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    _check_labels(labels, weight.shape[0], real_vocab_size, group, ignore_index)
    return _LinearCrossEntropy.apply(hidden, weight, labels.contiguous(), real_vocab_size, vocab_start, group,
                                     chunk_rows, ignore_index)
