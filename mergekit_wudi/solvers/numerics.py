"""The numeric rules every solver follows: one compute dtype, one finite check."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch


class NonFiniteError(ValueError):
    """NaN or Inf where a finite tensor is required; the message says which tensor."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def all_finite(tensor: torch.Tensor) -> bool:
    """True if ``tensor`` has no NaN or Inf.

    A finite sum proves every element finite (a NaN or Inf term makes the sum NaN or Inf), and a
    sum is one vectorised pass without a temporary: ~40x faster than ``isfinite(t).all()`` on a
    bf16 LLM weight on CPU. Only when the sum is not finite (a bad element, or finite elements
    whose sum overflows) is the element-wise test run.
    """
    if not tensor.is_floating_point() and not tensor.is_complex():
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_finite(tensor: torch.Tensor, what: str, hint: Optional[str] = None) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` (and ``hint``) if ``tensor`` has NaN or Inf."""
    if not all_finite(tensor):
        raise NonFiniteError(f"non-finite values (NaN or Inf) in {what}" + (f"; {hint}" if hint else ""))


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """Run the block on one CPU thread (no effect off the CPU or with one thread already).

    For loops of many small operations (chunked passes, small LAPACK factorizations): each is a
    parallel region whose end waits for every thread, and on a busy machine (more runnable threads
    than cores) one of them is often descheduled, so each region costs a scheduler time slice.
    Measured on a shared 2-core machine, one 8960 x 1536 fast-path merge of 2 experts took 3.7 s with
    2 threads against 0.9 s with 1, most of it in the chunked norm pass and a [20, 1536] SVD (issue
    #22). These loops are memory-bound or tiny, so one thread loses little on an idle machine.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def singular_value_floor(s: torch.Tensor, shape) -> torch.Tensor:
    """The largest singular value counted as zero for a matrix of ``shape`` whose singular values are ``s``
    (descending): ``torch.linalg.matrix_rank``'s tolerance ``max(shape) * eps * s_max``."""
    return s[0] * max(shape) * torch.finfo(s.dtype).eps


def squared_norms(tensors: torch.Tensor) -> torch.Tensor:
    """``[||t_i||_F^2]_i`` of a stack ``[T, ...]``, as accurate as ``t.square().sum()``.

    Summed in chunks of ``_NORM_CHUNK`` elements: a squared copy of an LLM weight costs more in page
    faults than the sum itself, and ``torch.dot`` / ``vector_norm`` lose 3-4 digits on 1e7 elements.
    """
    if tensors.numel() == 0:
        return tensors.new_zeros(tensors.shape[0])
    flat = tensors.reshape(tensors.shape[0], -1)
    with one_cpu_thread(tensors.device):
        return torch.stack([torch.stack([chunk.square().sum() for chunk in row.split(_NORM_CHUNK)]).sum()
                            for row in flat])


_NORM_CHUNK = 1 << 18


def finite_squared_norms(tensors: torch.Tensor, what: str = "task vector") -> torch.Tensor:
    """:func:`squared_norms`, or :class:`NonFiniteError` naming the first ``what`` whose norm is not
    finite. A NaN or Inf element makes its sum NaN or Inf, so this is also the finite check of the
    stack, at no extra pass (Eq. 1 divides by these norms: a NaN one must not pass as "not > 0")."""
    sq_norms = squared_norms(tensors)
    bad = ~torch.isfinite(sq_norms)
    if bool(bad.any()):
        raise NonFiniteError(
            f"non-finite values (NaN or Inf) in {what} {int(bad.nonzero()[0])}, or values so large that "
            f"its squared norm overflows {tensors.dtype}")
    return sq_norms


def add_cast_(out: torch.Tensor, other: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out += alpha * other`` with ``other`` cast to ``out``'s dtype element-wise; returns ``out``.

    The same values as ``out.add_(other.to(out.dtype), alpha=alpha)``. On CPU it runs in chunks:
    a mixed-dtype ``add_`` (bf16 into float32) takes a slow scalar path, and casting ``other`` whole
    costs a large new tensor; a chunk's cast stays in the allocator's cache.
    """
    if out.shape != other.shape:
        raise ValueError(f"add_cast_: shapes {tuple(out.shape)} and {tuple(other.shape)} differ")
    if out.device.type != "cpu" or other.dtype == out.dtype or not out.is_contiguous():
        return out.add_(other.to(out.dtype), alpha=alpha)
    flat_out, flat_other = out.view(-1), other.reshape(-1)
    with one_cpu_thread(out.device):
        for start in range(0, flat_out.numel(), _NORM_CHUNK):
            stop = start + _NORM_CHUNK
            flat_out[start:stop].add_(flat_other[start:stop].to(out.dtype), alpha=alpha)
    return out
