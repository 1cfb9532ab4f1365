"""polyattn.torch: gradcheck of every method, exact methods against torch's own attention, the adjoint against
the polynomial surrogate written in torch, layouts, training, and errors."""

import math

import pytest
import torch

import polyattn
import polyattn.torch as pt

EXACT_METHODS = ("exact_reference", "exact_blocked")


def causal_mask(n, m):
    """Query i sees keys j <= i + m - n (polyattn's bottom-right alignment)."""
    return torch.ones(n, m, dtype=torch.bool).tril(m - n)


def torch_attention(q, k, v, causal, scale=None):
    """softmax(c q k^T) v with torch autograd: the reference."""
    c = q.shape[-1] ** -0.5 if scale is None else scale
    s = c * q @ k.transpose(-1, -2)
    if causal:
        s = s.masked_fill(~causal_mask(*s.shape[-2:]), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def torch_taylor_attention(q, k, v, causal, degree, scale=None):
    """The polynomial surrogate the adjoint differentiates: weights p(c q.k), p the degree-g Taylor truncation."""
    c = q.shape[-1] ** -0.5 if scale is None else scale
    s = c * q @ k.transpose(-1, -2)
    a = sum(s ** t / math.factorial(t) for t in range(degree + 1))
    if causal:
        a = a.masked_fill(~causal_mask(*s.shape[-2:]), 0)
    return (a / a.sum(dim=-1, keepdim=True)) @ v


def random_inputs(batch, heads, n, m, dk, dv, seed, dtype=torch.float64, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(batch, heads, n, dk, generator=generator, dtype=dtype)
    k = scale * torch.randn(batch, heads, m, dk, generator=generator, dtype=dtype)
    v = torch.randn(batch, heads, m, dv, generator=generator, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def outputs_and_gradients(function, q, k, v, seed=99):
    """function(q, k, v) and the gradients of <g, output> for a fixed random g."""
    out = function(q, k, v)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return (out.detach(),) + torch.autograd.grad(out, (q, k, v), g)


def assert_close(actual, expected, relative):
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert (a - e).abs().max() <= relative * e.abs().max()


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch,heads", [(1, 1), (2, 3), (3, 2)])
def test_exact_methods_match_torch_attention_in_double(method, causal, batch, heads):
    q, k, v = random_inputs(batch, heads, 19, 19, 5, 4, seed=batch * 10 + heads)
    expected = outputs_and_gradients(lambda *x: torch_attention(*x, causal), q, k, v)
    actual = outputs_and_gradients(lambda *x: pt.attention(*x, method=method, causal=causal), q, k, v)
    assert_close(actual, expected, 1e-12)


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("causal", [False, True])
def test_exact_methods_with_more_keys_than_queries_and_another_scale(method, causal):
    q, k, v = random_inputs(2, 2, 7, 16, 4, 3, seed=21)
    expected = outputs_and_gradients(lambda *x: torch_attention(*x, causal, scale=0.3), q, k, v)
    actual = outputs_and_gradients(lambda *x: pt.attention(*x, method=method, causal=causal, scale=0.3), q, k, v)
    assert_close(actual, expected, 1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("degree", [2, 4])
def test_adjoint_is_the_exact_gradient_of_the_polynomial_surrogate(causal, degree):
    q, k, v = random_inputs(2, 2, 33, 33, 4, 3, seed=degree + causal)
    expected = outputs_and_gradients(lambda *x: torch_taylor_attention(*x, causal, degree), q, k, v)
    actual = outputs_and_gradients(lambda *x: pt.attention(*x, method="adjoint", causal=causal, degree=degree),
                                   q, k, v)
    assert_close(actual, expected, 1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("method,options", [("exact_reference", {}), ("exact_blocked", {}),
                                            ("adjoint", {}), ("adjoint", {"degree": 4, "feature_map": "kronecker"})])
def test_gradcheck_against_finite_differences_of_the_method_itself(method, options, causal):
    q, k, v = random_inputs(2, 2, 6, 6, 3, 2, seed=31)
    assert torch.autograd.gradcheck(lambda *x: pt.attention(*x, method=method, causal=causal, **options), (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_paper_where_its_polynomial_is_exact_to_rounding(causal):
    # The paper's backward approximates the exact gradient rather than differentiating its own forward, so it can
    # only pass gradcheck where both are the exact ones to well below gradcheck's tolerance: at R < 0.3 the
    # degree-12 Taylor truncation has eps ~ 1e-18 (certified below 1e-12).
    q, k, v = random_inputs(1, 2, 6, 6, 3, 2, seed=41, scale=0.25)
    _, certificate = pt.attention(q, k, v, method="paper", causal=causal, degree=12, return_certificate=True)
    assert certificate.radius < 0.3 and certificate.poly_error < 1e-12
    assert torch.autograd.gradcheck(lambda *x: pt.attention(*x, method="paper", causal=causal, degree=12), (q, k, v))


def test_paper_gradients_are_within_their_certified_bounds_of_torch_attention():
    q, k, v = random_inputs(1, 2, 40, 40, 4, 3, seed=43, scale=0.2)
    expected = outputs_and_gradients(lambda *x: torch_attention(*x, False), q, k, v)
    actual = outputs_and_gradients(lambda *x: pt.attention(*x, method="paper", degree=4), q, k, v)
    # The same problem through the numpy binding gives the gradient certificate (the torch path returns only the
    # forward one). Columns of the (n, heads * d) matrices are the heads side by side.
    as_matrix = lambda t: t.detach()[0].transpose(0, 1).reshape(40, -1).numpy()  # noqa: E731
    g = torch.randn(expected[0].shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    *_, certificate = polyattn.backward(as_matrix(q), as_matrix(k), as_matrix(v), as_matrix(g), method="paper",
                                        heads=2, degree=4)
    assert not certificate.forward.vacuous
    for a, e, bound in zip(actual[1:], expected[1:], (certificate.dq_bound, certificate.dk_bound,
                                                      certificate.dv_bound)):
        assert (a - e).abs().max() <= bound < 0.05 * e.abs().max()


def test_float32_follows_float64():
    q, k, v = random_inputs(2, 2, 50, 50, 8, 8, seed=51)
    expected = outputs_and_gradients(lambda *x: pt.attention(*x, method="adjoint", causal=True), q, k, v)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    actual = outputs_and_gradients(lambda *x: pt.attention(*x, method="adjoint", causal=True), q32, k32, v32)
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32
        assert (a.double() - e).abs().max() <= 1e-5 * e.abs().max()


def test_inputs_of_any_layout_give_the_same_results_and_outputs_take_their_layout():
    batch, heads, n, d = 2, 3, 10, 4
    q, k, v = random_inputs(batch, heads, n, n, d, d, seed=61)
    expected = outputs_and_gradients(lambda *x: pt.attention(*x, causal=True), q, k, v)
    layouts = {
        # (batch, n, heads * d) projections viewed as heads, as models write it
        "projection": lambda t: t.transpose(1, 2).reshape(batch, n, heads * d).view(batch, n, heads, d)
                                 .transpose(1, 2),
        # (batch, heads, d, n) memory: the column-major matrices polyattn computes on
        "columns": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
        "every other token": lambda t: torch.stack([t, t], dim=3).flatten(2, 3)[:, :, ::2],
        "expanded batch": lambda t: t[:1].expand(batch, -1, -1, -1),
    }
    for name, layout in layouts.items():
        inputs = [layout(t.detach()).requires_grad_() for t in (q, k, v)]
        actual = outputs_and_gradients(lambda *x: pt.attention(*x, causal=True), *inputs)
        reference = expected if name != "expanded batch" else outputs_and_gradients(
            lambda *x: pt.attention(*x, causal=True), *(t.detach().contiguous().requires_grad_() for t in inputs))
        for a, e in zip(actual, reference):
            assert torch.equal(a, e), name
        out = pt.attention(*inputs, causal=True)
        if name in ("projection", "columns"):
            assert out.stride() == inputs[0].stride(), name
    assert expected[0].is_contiguous()


@pytest.mark.parametrize("method", polyattn.methods)
def test_row_major_tensors_are_used_in_place(method):
    n, d = 40, 4
    generator = torch.Generator().manual_seed(62)
    layouts = {
        # (1, 1, n, d) contiguous: one head of a sequence, as the benchmarks call it
        "one head": lambda t: t[:, :1].contiguous(),
        # the heads view of a (1, n, heads * d) projection
        "projection": lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),
    }
    for name, layout in layouts.items():
        q, k, v, g = (layout(torch.randn(1, 3, n, d, generator=generator)) for _ in range(4))
        inputs = [t.requires_grad_() for t in (q, k, v)]
        copied = polyattn._core._copied_bytes()
        out = pt.attention(*inputs, causal=True, method=method)
        out.backward(g)
        assert polyattn._core._copied_bytes() == copied, name
        reference = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
        expected = pt.attention(*reference, causal=True, method=method)
        expected.backward(g.contiguous())
        assert torch.equal(out, expected), name
        for a, e in zip(inputs, reference):
            assert torch.equal(a.grad, e.grad), name
    # (batch, heads, n, d) contiguous with several heads is no row-major matrix of the C++ API: it is copied.
    q, k, v = (torch.randn(2, 3, n, d, generator=generator).requires_grad_() for _ in range(3))
    copied = polyattn._core._copied_bytes()
    pt.attention(q, k, v, method=method).sum().backward()
    assert polyattn._core._copied_bytes() > copied


def test_certificate_and_inference_without_gradients():
    q, k, v = random_inputs(2, 2, 16, 16, 4, 4, seed=71, scale=0.5)
    with torch.no_grad():
        out, certificate = pt.attention(q, k, v, method="adjoint", degree=4, return_certificate=True)
    assert out.grad_fn is None
    radius = 0.5 * (q.norm(dim=-1).amax(dim=-1) * k.norm(dim=-1).amax(dim=-1)).max().item()
    assert certificate.radius == pytest.approx(radius, rel=1e-12)
    assert (out - torch_attention(q, k, v, False)).abs().max() <= certificate.output_bound


def test_pooled_backends_keep_each_call_s_state_and_retained_graphs_recompute_it():
    # Backends go back to a pool after their backward pass and serve later calls of the same configuration.
    q, k, v = random_inputs(1, 2, 8, 8, 3, 3, seed=81)
    other = random_inputs(1, 2, 8, 8, 3, 3, seed=82, scale=0.5)
    expected = outputs_and_gradients(lambda *x: torch_taylor_attention(*x, True, 2), q, k, v)[1:]
    expected_other = outputs_and_gradients(lambda *x: torch_taylor_attention(*x, True, 2), *other)[1:]
    g = torch.randn(1, 2, 8, 3, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    out = pt.attention(q, k, v, method="adjoint", causal=True)            # backend A
    between = pt.attention(*other, method="adjoint", causal=True)         # backend B: A is in use
    first = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)     # A back in the pool
    pt.attention(*other, method="adjoint", causal=True).sum().backward()  # takes A: now holds this call's state
    second = torch.autograd.grad(out, (q, k, v), g)                       # runs out's forward pass again
    between_gradients = torch.autograd.grad(between, other, g)            # B kept between's state
    for a, b, e in zip(first, second, expected):
        assert torch.equal(a, b)
        assert (a - e).abs().max() <= 1e-12 * e.abs().max()
    for a, e in zip(between_gradients, expected_other):
        assert (a - e).abs().max() <= 1e-12 * e.abs().max()


def test_double_backward_is_refused():
    q, k, v = random_inputs(1, 2, 8, 8, 3, 3, seed=83)
    out = pt.attention(q, k, v, method="exact_blocked")
    with pytest.raises(RuntimeError, match="double backward \\(create_graph=True\\) is not supported"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


class TinyModel(torch.nn.Module):
    """Embedding, one attention layer with projections, a head: enough to train through polyattn.torch."""

    def __init__(self, attention, vocab=11, d_model=8, heads=2):
        super().__init__()
        self.attention, self.heads = attention, heads
        self.embedding = torch.nn.Embedding(vocab, d_model)
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.head = torch.nn.Linear(d_model, vocab)

    def forward(self, tokens):
        batch, n = tokens.shape
        x = self.embedding(tokens)
        q, k, v = (t.view(batch, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        y = self.attention(q, k, v).transpose(1, 2).reshape(batch, n, -1)
        return self.head(x + y)


def train(attention, optimizer_class, steps=3):
    torch.manual_seed(5)
    model = TinyModel(attention).double()
    optimizer = optimizer_class(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(6))
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def test_a_model_trains_through_polyattn_exactly_as_through_torch_attention():
    # SGD, whose step is linear in the gradient, so parameters differ by the gradients' rounding only (Adam divides
    # by the gradients' root mean square, which magnifies the rounding of near-zero entries).
    sgd = lambda parameters, lr: torch.optim.SGD(parameters, lr=lr, momentum=0.9)  # noqa: E731
    expected_losses, expected_parameters = train(lambda q, k, v: torch_attention(q, k, v, True), sgd)
    losses, parameters = train(lambda q, k, v: pt.attention(q, k, v, method="exact_blocked", causal=True), sgd)
    assert losses == pytest.approx(expected_losses, rel=1e-12)
    for p, e in zip(parameters, expected_parameters):
        assert (p - e).abs().max() <= 1e-12 * e.abs().max()
    adjoint_losses, _ = train(lambda q, k, v: pt.attention(q, k, v, method="adjoint", causal=True),
                              torch.optim.AdamW)
    assert all(math.isfinite(loss) for loss in adjoint_losses)


def test_bad_tensors_raise_clear_errors():
    q, k, v = (t.detach() for t in random_inputs(2, 2, 5, 5, 3, 3, seed=91))
    cases = [
        (TypeError, "argument 'q' must be a torch.Tensor, got ndarray", (q.numpy(), k, v), {}),
        (TypeError, "argument 'k' must be float32 or float64, got torch.int64", (q, k.long(), v), {}),
        (TypeError, "argument 'v' must be float32 or float64, got torch.float16", (q, k, v.half()), {}),
        (TypeError, "'q', 'k' and 'v' must have the same dtype, got torch.float64 and torch.float32 for 'k'",
         (q, k.float(), v), {}),
        (ValueError, "argument 'q' must have 4 dimensions \\(batch, heads, tokens, head dimension\\), got shape "
                     "\\(2, 5, 3\\)", (q[0], k, v), {}),
        (ValueError, "argument 'k' must be on the CPU .* got a tensor on meta", (q, k.to("meta"), v), {}),
        (ValueError, "must have the same batch and heads, got \\(2, 2\\) for 'q' and \\(1, 2\\) for 'v'",
         (q, k, v[:1]), {}),
        (ValueError, "must have the same batch and heads, got \\(2, 2\\) for 'q' and \\(2, 1\\) for 'k'",
         (q, k[:, :1], v), {}),
        (ValueError, "'q' and 'k' must have the same head dimension, got 3 and 2", (q, k[..., :2], v), {}),
        (ValueError, "'k' and 'v' must have as many tokens, got 5 and 4", (q, k, v[:, :, :4]), {}),
        (ValueError, "argument 'q' must be non-empty", (q[:, :, :0], k, v), {}),
        (TypeError, "'heads' is not an option here", (q, k, v), {"heads": 2}),
        (ValueError, "must be one of exact_reference, exact_blocked, paper, adjoint; got 'flash'", (q, k, v),
         {"method": "flash"}),
        (ValueError, "'degree' must be >= 0, got -2", (q, k, v), {"degree": -2}),
        (ValueError, "causal attention needs as many queries as keys", (q, torch.cat([k, k], 2),
                                                                        torch.cat([v, v], 2)), {"causal": True}),
    ]
    for error, message, arguments, options in cases:
        with pytest.raises(error, match=message):
            pt.attention(*arguments, **options)
    nan = q.clone()
    nan[1, 0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="argument 'Q' has a non-finite entry"):
        pt.attention(nan, k, v)
    with pytest.raises(polyattn.DomainError, match="RangePolicy::throw_error"):
        pt.attention(3 * q, 3 * k, v, radius=0.1, range_policy="throw_error")
    # torch itself refuses gradients of integer tensors, so none can reach polyattn.
    with pytest.raises(RuntimeError, match="floating point"):
        torch.ones(2, 2, 5, 3, dtype=torch.int64).requires_grad_()
