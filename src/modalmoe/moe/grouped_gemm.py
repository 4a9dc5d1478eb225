"""Grouped GEMM on the CPU: one call that multiplies each expert's rows by its own weight.

PyTorch has no variable-size batched matmul on the CPU (``torch._grouped_mm`` loops inside
and its backward fails on stride-0 gradients), but the MKL that PyTorch's x86 builds link
exports ``cblas_?gemm_batch``, which takes groups of different sizes and parallelises over
them: each thread runs whole GEMMs, so small per-expert matmuls stop paying for intra-GEMM
threading and repeated packing. Measured on a 2-core machine, E=64 experts with 23..176
rows each (4096 rows, 512 -> 2048): dense 1.00, one padded-free ``bmm`` over equal counts
1.28, this grouped call 1.32, a per-expert ``torch.mm`` loop 1.54.

Large groups are the exception: MKL runs a batch of single-GEMM groups about 5-10% slower
than the same GEMMs called one by one once each has several hundred rows (measured here,
8 experts of ~512 rows, 512 -> 1024: forward 1.09x vs 1.03x the dense matmul, weight
gradient 1.14x vs 1.05x), so segments with at least ``LARGE_WORK`` multiply-adds (384 rows
at that size) go through ``torch.mm`` one by one and only the rest are batched.

``available(x)`` says whether the fast path applies (float32/float64 CPU tensors and a
PyTorch build that exports the symbol); callers fall back to their own code otherwise.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
from torch import Tensor

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

# Segments with at least this much work (rows x K x N multiply-adds) run as their own
# torch.mm (threaded inside the GEMM) rather than in the batch. Measured at K x N = 512 x 1024:
# between 256 rows (batch faster) and 512 rows (loop faster), so 384 rows of that size. The
# threshold is on work, not rows: at K x N = 64 x 128 (the presets' sizes) ~400-row segments
# ran 3.7x slower one by one than batched, since each small GEMM pays a call and threading
# overhead that the batch shares.
LARGE_ROWS = 384
LARGE_WORK = LARGE_ROWS * 512 * 1024


@functools.cache
def _mkl_functions() -> dict[torch.dtype, ctypes._CFuncPtr] | None:
    if os.environ.get("MODALMOE_DISABLE_MKL_GROUPED_GEMM"):
        return None
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        found = {torch.float32: lib.cblas_sgemm_batch, torch.float64: lib.cblas_dgemm_batch}
    except (OSError, AttributeError):
        return None
    for fn in found.values():
        fn.restype = None
    return found


def available(*tensors: Tensor) -> bool:
    """True when the MKL grouped GEMM can run on these tensors."""
    functions = _mkl_functions()
    return functions is not None and all(t.device.type == "cpu" and t.dtype in functions for t in tensors)


def _call(dtype, trans_a, trans_b, m, n, k, a_ptrs, lda, b_ptrs, ldb, c_ptrs, ldc) -> None:
    """One ``cblas_?gemm_batch`` call with one group per product (all lists of equal length)."""
    count = len(m)
    if count == 0:
        return
    ctype = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
    ints = ctypes.c_int * count
    ptrs = ctypes.c_void_p * count
    _mkl_functions()[dtype](
        _ROW_MAJOR,
        ints(*([trans_a] * count)),
        ints(*([trans_b] * count)),
        ints(*m),
        ints(*n),
        ints(*k),
        (ctype * count)(*([1.0] * count)),
        ptrs(*a_ptrs),
        ints(*([lda] * count)),
        ptrs(*b_ptrs),
        ints(*([ldb] * count)),
        (ctype * count)(*([0.0] * count)),
        ptrs(*c_ptrs),
        ints(*([ldc] * count)),
        count,
        ints(*([1] * count)),
    )


def _segments(counts: tuple[int, ...], row_work: int) -> tuple[list, list]:
    """Non-empty (expert, start, count) segments, split into (batched, large); ``row_work`` is
    one row's multiply-adds (K x N)."""
    small, large, start = [], [], 0
    for expert, count in enumerate(counts):
        if count:
            (large if count * row_work >= LARGE_WORK else small).append((expert, start, count))
        start += count
    return small, large


def grouped_mm(x: Tensor, w: Tensor, counts: tuple[int, ...], *, transpose_w: bool = False) -> Tensor:
    """Rows of each expert times its weight.

    Args:
        x: [A, K] rows sorted by expert, contiguous.
        w: [E, K, N] contiguous (or [E, N, K] with ``transpose_w``, multiplying by ``w[e].T``).
        counts: rows per expert.

    Returns:
        [A, N].
    """
    k_dim, n_dim = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    out = x.new_empty(x.shape[0], n_dim)
    seg, large = _segments(counts, k_dim * n_dim)
    for expert, start, count in large:
        weight = w[expert].t() if transpose_w else w[expert]
        torch.mm(x[start : start + count], weight, out=out[start : start + count])
    item, xp, wp, op = x.element_size(), x.data_ptr(), w.data_ptr(), out.data_ptr()
    _call(
        x.dtype,
        _NO_TRANS,
        _TRANS if transpose_w else _NO_TRANS,
        [c for _, _, c in seg],
        [n_dim] * len(seg),
        [k_dim] * len(seg),
        [xp + s * k_dim * item for _, s, _ in seg],
        k_dim,
        [wp + e * w.shape[1] * w.shape[2] * item for e, _, _ in seg],
        w.shape[2],
        [op + s * n_dim * item for _, s, _ in seg],
        n_dim,
    )
    return out


def grouped_weight_grad(x: Tensor, g: Tensor, counts: tuple[int, ...]) -> Tensor:
    """Per-expert ``x_e.T @ g_e``: the weight gradient of ``grouped_mm``.

    Args:
        x: [A, K] rows sorted by expert, contiguous.
        g: [A, N] gradient rows, contiguous.
        counts: rows per expert.

    Returns:
        [E, K, N]; zero for experts with no rows.
    """
    k_dim, n_dim = x.shape[1], g.shape[1]
    out = x.new_empty(len(counts), k_dim, n_dim)
    for expert, count in enumerate(counts):
        if not count:
            out[expert].zero_()
    seg, large = _segments(counts, k_dim * n_dim)
    for expert, start, count in large:
        torch.mm(x[start : start + count].t(), g[start : start + count], out=out[expert])
    item = x.element_size()
    _call(
        x.dtype,
        _TRANS,
        _NO_TRANS,
        [k_dim] * len(seg),
        [n_dim] * len(seg),
        [c for _, _, c in seg],
        [x.data_ptr() + s * k_dim * item for _, s, _ in seg],
        k_dim,
        [g.data_ptr() + s * n_dim * item for _, s, _ in seg],
        n_dim,
        [out.data_ptr() + e * k_dim * n_dim * item for e, _, _ in seg],
        n_dim,
    )
    return out
