"""polyattn attention for PyTorch models (CPU tensors, float32 and float64).

``attention(q, k, v, ...)`` takes tensors shaped like ``torch.nn.functional.scaled_dot_product_attention`` takes
them, q ``(batch, heads, n, d_k)``, k ``(batch, heads, m, d_k)``, v ``(batch, heads, m, d_v)``, and returns
``(batch, heads, n, d_v)``. It is differentiable (``loss.backward()``, any optimizer) through
``AttentionFunction``, whose backward pass is polyattn's:

    import polyattn.torch
    y = polyattn.torch.attention(q, k, v, causal=True, method="adjoint", degree=2)

**Layout.** polyattn computes every head of every batch element in one C++ call (measured on the loaded
machine, (4, 4, 4096, 16) causal adjoint forward+backward: 109 ms CPU, against 205 ms for 16 calls of one head
each), on matrices of n rows with the heads side by side in columns. So the certificate's R is the maximum over every
batch element and head, and so is the interval a minimax polynomial or ``range_policy='raise_degree'`` chooses.
Inputs of any strides are accepted. Used in place by every method, with no copy at all: ``(batch, heads, d, n)``
memory (``t.transpose(-1, -2)`` contiguous), and the tensors whose memory is one row-major matrix: one head
``(1, 1, n, d)`` contiguous, or the heads view of a projection ``x.view(1, n, heads, d).transpose(1, 2)`` (the
kernels transpose each chunk of rows in cache). Other layouts,
``(batch, heads, n, d)`` contiguous with several heads among them, are copied into column-major matrices inside the
C++ call (no copy in Python or torch). The output and the gradients are laid out like q (and dk like k, dv like v),
so that merging the heads back (``y.transpose(1, 2).reshape(batch, n, -1)``) or accumulating a leaf's gradient
copies nothing more.

**Methods and options** are those of ``polyattn.Options`` (keyword arguments with the C++ defaults); ``heads``
comes from the tensors. The causal mask is aligned bottom-right: with n queries and m >= n keys, query i sees keys
j <= i + m - n (torch's ``is_causal`` aligns top-left); the polynomial methods need n = m.

**Memory.** The backward pass uses what the forward pass kept in its C++ backend (the exact methods' softmax
statistics, the adjoint's scan checkpoints); nothing is recomputed. Backends are reused: after its backward pass a
backend returns to a pool (at most 16 idle ones per method, options and head count) and serves a later call with
its workspaces already in memory, as a C++ layer keeps its backend. Only a second backward pass through a retained
graph (``retain_graph=True``) whose backend has been reused meanwhile runs the forward pass again.

Errors: ``TypeError`` for a non-tensor or a dtype other than float32/float64 (or mixed dtypes); ``ValueError`` for
a wrong rank, mismatched batch, heads or sizes, a tensor not on the CPU, and whatever the C++ call rejects;
``polyattn.DomainError`` for overflow and the like. Double backward is not supported.
"""

import itertools
import threading

import torch

from . import _core

__all__ = ["AttentionFunction", "attention"]

_DTYPES = (torch.float32, torch.float64)


def _empty_like_layout(t, shape):
    """An uninitialised tensor of ``shape`` whose dimensions lie in memory in the order of ``t``'s (as
    ``torch.empty_like`` keeps a dense layout), dense; ``shape`` may differ from ``t.shape`` in extents."""
    order = sorted(range(t.dim()), key=lambda axis: -t.stride(axis))  # outermost first; ties keep axis order
    strides, step = [0] * t.dim(), 1
    for axis in reversed(order):
        strides[axis] = step
        step *= shape[axis]
    return torch.empty_strided(shape, strides, dtype=t.dtype)


def _array(t):
    """The numpy array over ``t``'s memory, with its strides (no copy)."""
    return t.detach().numpy()


class _Lease:
    """A C++ backend with the token of the forward call whose state it holds (None while idle)."""

    def __init__(self, key, attention):
        self.key, self.attention, self.owner = key, attention, None


class _BackendPool:
    """Idle backends by (method, options), reused by later calls. A fresh backend would fault its workspaces in
    page by page on every call (1000 to 2400 minor page faults per forward+backward at n = 65536, d = 16, several
    percent of the call), where a reused one finds them in memory."""

    max_idle = 16

    def __init__(self):
        self._lock = threading.Lock()
        self._idle = {}
        self._tokens = itertools.count()

    def take(self, method, options):
        key = (method, repr(options))
        with self._lock:
            idle = self._idle.get(key)
            lease = idle.pop() if idle else None
            token = next(self._tokens)
        if lease is None:
            lease = _Lease(key, _core.Attention(method, options))
        lease.owner = token
        return lease

    def give(self, lease):
        with self._lock:
            lease.owner = None
            idle = self._idle.setdefault(lease.key, [])
            if len(idle) < self.max_idle:
                idle.append(lease)


_pool = _BackendPool()


class AttentionFunction(torch.autograd.Function):
    """``apply(q, k, v, method, options)`` -> ``(output, Certificate)``; ``options`` a ``polyattn.Options`` whose
    ``heads`` is batch * heads. Prefer ``attention()``, which checks the tensors and builds the options."""

    @staticmethod
    def forward(ctx, q, k, v, method, options):
        out = _empty_like_layout(q, (*q.shape[:3], v.shape[3]))
        lease = _pool.take(method, options)
        # Autograd refuses a backward pass through saved tensors modified in place, so the backend may keep the
        # column-major copies of q, k, v and out that this call makes, and backward() skips copying them again.
        keep = any(ctx.needs_input_grad[:3])
        try:
            _, certificate = lease.attention.forward(_array(q), _array(k), _array(v), out=_array(out),
                                                     keep_copies=keep)
        except BaseException:
            _pool.give(lease)
            raise
        if keep:
            ctx.lease, ctx.token, ctx.method, ctx.options = lease, lease.owner, method, options
            ctx.save_for_backward(q, k, v, out)
        else:
            _pool.give(lease)
        return out, certificate

    @staticmethod
    def backward(ctx, grad_out, _grad_certificate):
        # Refused rather than left to torch.autograd.function.once_differentiable, which raises only when grad_out
        # itself requires a gradient and otherwise drops the second-order terms silently.
        if torch.is_grad_enabled():
            raise RuntimeError("polyattn.torch.attention: double backward (create_graph=True) is not supported")
        q, k, v, out = ctx.saved_tensors
        lease = ctx.lease
        if lease.owner != ctx.token:  # a second backward pass; the backend went back to the pool after the first
            lease = _pool.take(ctx.method, ctx.options)
            out = _empty_like_layout(out, out.shape)
            try:
                lease.attention.forward(_array(q), _array(k), _array(v), out=_array(out))
            except BaseException:
                _pool.give(lease)
                raise
        dq, dk, dv = (_empty_like_layout(t, t.shape) for t in (q, k, v))
        try:
            lease.attention.backward(_array(q), _array(k), _array(v), _array(out), _array(grad_out),
                                     dq=_array(dq), dk=_array(dk), dv=_array(dv))
        finally:
            _pool.give(lease)
        return dq, dk, dv, None, None


def _check(q, k, v):
    where = "polyattn.torch.attention"
    tensors = {"q": q, "k": k, "v": v}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{where}: argument '{name}' must be float32 or float64, got {t.dtype}")
        if t.device.type != "cpu":
            raise ValueError(f"{where}: argument '{name}' must be on the CPU (polyattn computes there), "
                             f"got a tensor on {t.device}")
        if t.layout != torch.strided:
            raise ValueError(f"{where}: argument '{name}' must be a dense (strided) tensor, got layout {t.layout}")
        if t.dim() != 4:
            raise ValueError(f"{where}: argument '{name}' must have 4 dimensions (batch, heads, tokens, head "
                             f"dimension), got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{where}: argument '{name}' must be non-empty, got shape {tuple(t.shape)}")
    for name in ("k", "v"):
        if tensors[name].dtype != q.dtype:
            raise TypeError(f"{where}: 'q', 'k' and 'v' must have the same dtype, got {q.dtype} and "
                            f"{tensors[name].dtype} for '{name}'")
        if tensors[name].shape[:2] != q.shape[:2]:
            raise ValueError(f"{where}: 'q', 'k' and 'v' must have the same batch and heads, got "
                             f"{tuple(q.shape[:2])} for 'q' and {tuple(tensors[name].shape[:2])} for '{name}'")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{where}: 'q' and 'k' must have the same head dimension, got {q.shape[3]} and {k.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"{where}: 'k' and 'v' must have as many tokens, got {k.shape[2]} and {v.shape[2]}")


def attention(q, k, v, *, method="adjoint", causal=False, scale=None, return_certificate=False, **options):
    """Softmax attention of q (batch, heads, n, d_k), k (batch, heads, m, d_k), v (batch, heads, m, d_v) by
    polyattn's ``method`` ('exact_reference', 'exact_blocked', 'paper' or 'adjoint'): (batch, heads, n, d_v),
    differentiable. ``scale`` defaults to 1/sqrt(d_k); ``options`` are the other fields of ``polyattn.Options``
    (degree, polynomial, feature_map, radius, range_policy, estimate_error, ...). With ``return_certificate``
    returns ``(output, polyattn.Certificate)`` (the certificate covers every batch element and head)."""
    _check(q, k, v)
    if "heads" in options:
        raise TypeError("polyattn.torch.attention: 'heads' is not an option here, it is the second dimension of "
                        "the tensors")
    batch, heads = q.shape[:2]
    call_options = _core.Options(causal=causal, heads=batch * heads, scale=scale, **options)
    out, certificate = AttentionFunction.apply(q, k, v, method, call_options)
    return (out, certificate) if return_certificate else out
