"""A downstream Python program: the installed package (PYTHONPATH=<prefix>/lib/python3.X/site-packages), causal
polynomial attention checked against a numpy reference within its certificate, and one polyattn.torch call, so
that a broken install fails loudly."""

import os
import sys

import numpy as np

import polyattn
import polyattn.torch
import torch

prefix_dirs = [os.path.realpath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if not any(os.path.realpath(polyattn.__file__).startswith(p + os.sep) for p in prefix_dirs):
    sys.exit(f"polyattn consumer: imported {polyattn.__file__}, not the installed package on PYTHONPATH")

rng = np.random.default_rng(0)
n, d = 64, 8
q, k = (0.3 * rng.uniform(-1, 1, (n, d)) for _ in range(2))
v = rng.uniform(-1, 1, (n, d))
o, certificate = polyattn.forward(q, k, v, method="adjoint", causal=True, degree=6)
scores = np.where(np.tril(np.ones((n, n), dtype=bool)), q @ k.T / np.sqrt(d), -np.inf)
weights = np.exp(scores - scores.max(axis=1, keepdims=True))
exact = (weights / weights.sum(axis=1, keepdims=True)) @ v
error = np.abs(o - exact).max()
print(f"polyattn Python consumer: max |O - O_exact| = {error:.3g}, certified bound {certificate.output_bound:.3g}")
t = torch.from_numpy(q).reshape(1, 1, n, d).requires_grad_()
polyattn.torch.attention(t, t, t, causal=True).sum().backward()
sys.exit(0 if not certificate.vacuous and error <= certificate.output_bound and t.grad is not None else 1)
