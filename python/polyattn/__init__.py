"""polyattn: softmax attention and its gradients in almost linear time, from Python.

The C++ library's attention backends on numpy arrays (the extension module ``polyattn._core``), and, in
``polyattn.torch``, a ``torch.autograd.Function`` for models trained in PyTorch.

Arrays are 2-D, one token per row, heads side by side in columns: q and k are ``n x heads * d_k``, v is
``m x heads * d_v``, float32 or float64 (all the same); or all 4-D ``(batch, heads, n, d)`` with the option
``heads = batch * heads``. Fortran-ordered arrays are read in place; so are C-ordered ones (or column blocks of
them) when every array of the call is one. Other layouts are read without a copy in Python and transposed once
inside the call into the column-major layout of the C++ kernels.
New outputs are Fortran-ordered when q is, else C-ordered; ``out=`` (``dq=``, ``dk=``, ``dv=``) takes arrays of
any layout.

    import numpy as np, polyattn
    q, k, v = (np.random.randn(4096, 64).astype(np.float32) for _ in range(3))
    o, cert = polyattn.forward(q, k, v, method="adjoint", causal=True, heads=4)
    attention = polyattn.Attention("adjoint", causal=True, heads=4)   # keeps what backward needs
    o, cert = attention.forward(q, k, v)
    dq, dk, dv, grad_cert = attention.backward(q, k, v, o, np.ones_like(o))

Methods (``polyattn.methods``): ``exact_reference`` (materialised n x n), ``exact_blocked`` (streaming, exact),
``paper`` (Algorithm 1 of Liang et al.: approximate gradient) and ``adjoint`` (the exact gradient of the polynomial
forward pass). Options are keyword arguments, see ``polyattn.Options``; their defaults are the C++ defaults.

Errors: ``ValueError`` for invalid arguments (shapes, non-finite entries, options, outputs overlapping inputs),
``TypeError`` for wrong types and dtypes, ``polyattn.DomainError`` (an ``ArithmeticError``) for what cannot hold
numerically (overflow, a polynomial not positive on the scores, a radius beyond the configured interval); the
message names the function, the argument and the expected and actual values.
"""

from ._core import (  # noqa: F401 (re-exported)
    Attention,
    Certificate,
    DomainError,
    GradientCertificate,
    Options,
    methods,
    num_threads,
    set_num_threads,
)

__all__ = ["Attention", "Certificate", "DomainError", "GradientCertificate", "Options", "backward", "forward",
           "methods", "num_threads", "set_num_threads"]


def forward(q, k, v, *, method="adjoint", **options):
    """Attention output and its certificate: ``(o, Certificate)``. ``options`` as for ``polyattn.Options``."""
    return Attention(method, **options).forward(q, k, v)


def backward(q, k, v, g, *, method="adjoint", **options):
    """Gradients of ``<g, attention(q, k, v)>``: ``(dq, dk, dv, GradientCertificate)``.

    Runs the forward pass first (the backward pass needs what it saves); to differentiate an output you already
    computed, keep the ``polyattn.Attention`` object that computed it and call its ``backward``.
    """
    attention = Attention(method, **options)
    o, _ = attention.forward(q, k, v)
    return attention.backward(q, k, v, o, g)
