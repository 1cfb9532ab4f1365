"""polyattn's numpy binding (polyattn._core through the polyattn package): results against a numpy reference,
array layouts, certificates, options, threads and errors."""

import threading
import time

import numpy as np
import pytest

import polyattn

EXACT_METHODS = ("exact_reference", "exact_blocked")


def reference(q, k, v, heads, causal, scale=None):
    """Softmax attention and the gradients of <g, o> by materialised matrices in float64, head by head."""
    n, m = q.shape[0], k.shape[0]
    dk, dv = q.shape[1] // heads, v.shape[1] // heads
    c = 1 / np.sqrt(dk) if scale is None else scale
    mask = np.tril(np.ones((n, m), dtype=bool), m - n) if causal else np.ones((n, m), dtype=bool)
    out = np.empty((n, v.shape[1]))
    probabilities = []
    for h in range(heads):
        qs, ks, vs = q[:, h * dk:(h + 1) * dk], k[:, h * dk:(h + 1) * dk], v[:, h * dv:(h + 1) * dv]
        s = np.where(mask, c * qs @ ks.T, -np.inf)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[:, h * dv:(h + 1) * dv] = p @ vs
        probabilities.append(p)

    def gradients(g):
        dq, dk_, dv_ = np.empty(q.shape), np.empty(k.shape), np.empty(v.shape)
        for h, p in enumerate(probabilities):
            qs, ks, vs = q[:, h * dk:(h + 1) * dk], k[:, h * dk:(h + 1) * dk], v[:, h * dv:(h + 1) * dv]
            gs = g[:, h * dv:(h + 1) * dv]
            dp = gs @ vs.T
            ds = p * (dp - (dp * p).sum(axis=1, keepdims=True))
            dq[:, h * dk:(h + 1) * dk] = c * ds @ ks
            dk_[:, h * dk:(h + 1) * dk] = c * ds.T @ qs
            dv_[:, h * dv:(h + 1) * dv] = p.T @ gs
        return dq, dk_, dv_

    return out, gradients


def random_problem(n, m, heads, dk, dv, seed, dtype=np.float64, scale=1.0):
    rng = np.random.default_rng(seed)
    q = scale * rng.standard_normal((n, heads * dk))
    k = scale * rng.standard_normal((m, heads * dk))
    v = rng.standard_normal((m, heads * dv))
    g = rng.standard_normal((n, heads * dv))
    return tuple(x.astype(dtype) for x in (q, k, v, g))


def max_relative_error(actual, expected):
    return np.abs(actual - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [1, 3])
def test_exact_methods_match_the_reference_in_double(method, causal, heads):
    q, k, v, g = random_problem(37, 37, heads, 5, 4, seed=heads + 10 * causal)
    expected, gradients = reference(q, k, v, heads, causal)
    attention = polyattn.Attention(method, causal=causal, heads=heads)
    o, certificate = attention.forward(q, k, v)
    assert max_relative_error(o, expected) < 1e-12
    dq, dk, dv, gradient_certificate = attention.backward(q, k, v, o, g)
    for actual, exact in zip((dq, dk, dv), gradients(g)):
        assert max_relative_error(actual, exact) < 1e-12
    assert certificate.output_bound == 0 and gradient_certificate.dqk_bound == 0


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_exact_causal_with_fewer_queries_than_keys_is_aligned_bottom_right(method):
    q, k, v, g = random_problem(9, 23, 2, 4, 3, seed=5)
    expected, gradients = reference(q, k, v, 2, causal=True)
    dq, dk, dv, _ = polyattn.backward(q, k, v, g, method=method, causal=True, heads=2)
    o, _ = polyattn.forward(q, k, v, method=method, causal=True, heads=2)
    assert max_relative_error(o, expected) < 1e-12
    for actual, exact in zip((dq, dk, dv), gradients(g)):
        assert max_relative_error(actual, exact) < 1e-12


def test_float32_runs_in_float32_close_to_double():
    q, k, v, g = random_problem(64, 64, 2, 8, 8, seed=3)
    o64, _ = polyattn.forward(q, k, v, method="exact_blocked", heads=2)
    o32, _ = polyattn.forward(*(x.astype(np.float32) for x in (q, k, v)), method="exact_blocked", heads=2)
    assert o32.dtype == np.float32
    assert max_relative_error(o32, o64) < 1e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fortran_ordered_input_is_read_in_place(dtype):
    # The C++ call rejects an output that overlaps an input in memory; it can only see the overlap if it reads
    # the caller's array itself, not a copy.
    q, k, v, _ = (np.asfortranarray(x) for x in random_problem(16, 16, 1, 4, 4, seed=1, dtype=dtype))
    attention = polyattn.Attention("exact_blocked")
    with pytest.raises(ValueError, match="output 'O' overlaps input 'Q'"):
        attention.forward(q, k, v, out=q)
    # A column block of a Fortran-ordered array is read in place too; the other block may take the output.
    buffer = np.asfortranarray(np.concatenate([q, np.zeros_like(q)], axis=1))
    expected, _ = attention.forward(q, k, v)
    o, _ = attention.forward(buffer[:, :4], k, v, out=buffer[:, 4:])
    assert o.base is not None and np.shares_memory(o, buffer)
    np.testing.assert_array_equal(buffer[:, 4:], expected)
    with pytest.raises(ValueError, match="overlaps input 'Q'"):
        attention.forward(buffer[:, 2:6], k, v, out=buffer[:, 4:])


@pytest.mark.parametrize("method", polyattn.methods)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_c_ordered_arrays_are_read_and_written_in_place(method, dtype, causal):
    q, k, v, g = random_problem(37, 37, 2, 5, 3, seed=4, dtype=dtype)
    q, k, v, g = (np.ascontiguousarray(x) for x in (q, k, v, g))
    attention = polyattn.Attention(method, heads=2, causal=causal)
    copied = polyattn._core._copied_bytes()
    o, _ = attention.forward(q, k, v)
    dq, dk, dv, _ = attention.backward(q, k, v, o, g)
    assert polyattn._core._copied_bytes() == copied
    assert all(x.flags["C_CONTIGUOUS"] for x in (o, dq, dk, dv))
    # Bitwise the results of the column-major arrays, which every method reads in place.
    fortran = [np.asfortranarray(x) for x in (q, k, v)]
    o_fortran, _ = attention.forward(*fortran)
    np.testing.assert_array_equal(o, o_fortran)
    for actual, expected in zip((dq, dk, dv), attention.backward(*fortran, o_fortran, np.asfortranarray(g))[:3]):
        np.testing.assert_array_equal(actual, expected)
    # The C++ call sees the caller's memory, so it finds an output overlapping an input, also in a column block.
    with pytest.raises(ValueError, match="output 'O' overlaps input 'Q'"):
        attention.forward(q, k, v, out=q[:, :6])
    buffer = np.ascontiguousarray(np.concatenate([q, np.zeros((37, 6), dtype)], axis=1))
    o_block, _ = attention.forward(buffer[:, :10], k, v, out=buffer[:, 10:])
    assert np.shares_memory(o_block, buffer)
    np.testing.assert_array_equal(buffer[:, 10:], o)
    with pytest.raises(ValueError, match="overlaps input"):
        attention.backward(q, k, v, o, g, dq=q, dk=dk, dv=dv)
    # Mixed layouts are no call on row-major matrices: the C-ordered arrays are copied into column-major ones.
    attention.forward(q, np.asfortranarray(k), v)
    assert polyattn._core._copied_bytes() > copied


def test_every_layout_gives_the_same_result():
    q, k, v, g = random_problem(21, 21, 2, 3, 3, seed=2)
    attention = polyattn.Attention("adjoint", heads=2, causal=True)
    o, _ = attention.forward(q, k, v)
    expected = attention.backward(q, k, v, o, g)[:3]
    strided = np.zeros((42, 12))
    strided[::2, ::2] = q
    layouts = {
        "C order": np.ascontiguousarray(q),
        "Fortran order": np.asfortranarray(q),
        "rows of a bigger array": np.ascontiguousarray(np.concatenate([q, q], axis=1))[:, :6],
        "every other row and column": strided[::2, ::2],
        "reversed twice": np.ascontiguousarray(q[::-1, ::-1])[::-1, ::-1],
    }
    for name, layout in layouts.items():
        np.testing.assert_array_equal(layout, q)
        o_layout, _ = attention.forward(layout, k, v)
        np.testing.assert_array_equal(o_layout, o, err_msg=name)
        for actual, exact in zip(attention.backward(layout, k, v, o_layout, g)[:3], expected):
            np.testing.assert_array_equal(actual, exact, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_c_order_arrays_with_whole_simd_tiles_equal_fortran_order(dtype):
    # Heads of 16 and 17 columns and 37 rows: C-order arrays are transposed in SIMD tiles (16 x 16 floats, 8 x 8
    # doubles) plus the rows and columns past the last whole tile; the results must be Fortran order's, bit for bit.
    for dk, dv in ((16, 17), (17, 16)):
        q, k, v, g = random_problem(37, 37, 2, dk, dv, seed=6, dtype=dtype, scale=0.3)
        attention = polyattn.Attention("adjoint", heads=2, causal=True)
        fortran = [np.asfortranarray(x) for x in (q, k, v, g)]
        o_f, _ = attention.forward(*fortran[:3])
        grads_f = attention.backward(*fortran[:3], o_f, fortran[3])[:3]
        o_c, _ = attention.forward(q, k, v)
        assert o_c.flags.c_contiguous
        np.testing.assert_array_equal(o_c, o_f)
        grads_c = attention.backward(q, k, v, o_c, g)[:3]
        for actual, exact in zip(grads_c, grads_f):
            assert actual.flags.c_contiguous
            np.testing.assert_array_equal(actual, exact)


def test_outputs_follow_the_order_of_q_or_go_into_out():
    q, k, v, g = random_problem(12, 12, 1, 4, 4, seed=4)
    attention = polyattn.Attention("exact_reference")
    o, _ = attention.forward(q, k, v)
    assert o.flags.c_contiguous and o.shape == (12, 4)
    o_fortran, _ = attention.forward(np.asfortranarray(q), k, v)
    assert o_fortran.flags.f_contiguous
    np.testing.assert_array_equal(o_fortran, o)
    for out in (np.empty((12, 4), order="F"), np.empty((12, 4)), np.empty((12, 8))[:, ::2]):
        returned, _ = attention.forward(q, k, v, out=out)
        assert returned is out
        np.testing.assert_array_equal(out, o)
    with pytest.raises(ValueError, match="argument 'out' must have shape \\(12, 4\\), got \\(4, 12\\)"):
        attention.forward(q, k, v, out=np.empty((4, 12)))
    with pytest.raises(TypeError, match="argument 'out' must have the inputs' dtype float64, got float32"):
        attention.forward(q, k, v, out=np.empty((12, 4), dtype=np.float32))
    read_only = np.empty((12, 4))
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="argument 'out' must be writeable"):
        attention.forward(q, k, v, out=read_only)
    shared = np.empty((12, 4))
    with pytest.raises(ValueError, match="outputs 'dq' and 'dv' overlap in memory"):
        attention.backward(q, k, v, o, g, dq=shared, dv=shared)
    dq = np.empty(q.shape, order="F")
    returned = attention.backward(q, k, v, o, g, dq=dq)[0]
    assert returned is dq
    np.testing.assert_array_equal(dq, attention.backward(q, k, v, o, g)[0])


def test_four_dimensional_arrays_are_batches_of_heads():
    # (batch, heads, tokens, d): each batch element's head is a head of one call, as polyattn.torch uses it.
    batch, heads, n, d = 2, 3, 10, 4
    rng = np.random.default_rng(14)
    q4, k4, v4, g4 = (rng.standard_normal((batch, heads, n, d)) for _ in range(4))
    as_matrix = lambda x: np.ascontiguousarray(x.transpose(2, 0, 1, 3).reshape(n, -1))  # noqa: E731
    attention = polyattn.Attention("adjoint", causal=True, heads=batch * heads)
    o, _ = attention.forward(*(as_matrix(x) for x in (q4, k4, v4)))
    gradients = attention.backward(*(as_matrix(x) for x in (q4, k4, v4)), o, as_matrix(g4))[:3]
    o4, _ = attention.forward(q4, k4, v4)
    assert o4.shape == (batch, heads, n, d) and o4.flags.c_contiguous
    np.testing.assert_array_equal(as_matrix(o4), o)
    for actual, expected in zip(attention.backward(q4, k4, v4, o4, g4)[:3], gradients):
        np.testing.assert_array_equal(as_matrix(actual), expected)
    # Memory laid out as (batch, heads, d, tokens) is the column-major matrix itself: read in place.
    columns = [np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2) for x in (q4, k4, v4)]
    with pytest.raises(ValueError, match="output 'O' overlaps input 'Q'"):
        attention.forward(*columns, out=columns[0])
    with pytest.raises(ValueError, match="need the option heads = batch \\* heads = 6, got 2"):
        polyattn.Attention("adjoint", heads=2).forward(q4, k4, v4)
    with pytest.raises(ValueError, match="arguments 'q' and 'k' must both be 2-D or both 4-D with the same batch and "
                                         "heads, got \\(2, 3, 10, 4\\) and \\(1, 3, 10, 4\\)"):
        attention.forward(q4, k4[:1], v4)
    with pytest.raises(ValueError, match="must both be 2-D or both 4-D"):
        attention.forward(q4, as_matrix(k4), v4)


@pytest.mark.parametrize("causal", [False, True])
def test_polynomial_certificate_bounds_the_error(causal):
    q, k, v, _ = random_problem(50, 50, 2, 4, 3, seed=7, scale=0.3)
    exact, _ = reference(q, k, v, 2, causal)
    o, certificate = polyattn.forward(q, k, v, method="adjoint", heads=2, causal=causal, degree=4,
                                      estimate_error=True, estimate_rows=8)
    radius = max(0.5 * np.linalg.norm(q[:, h * 4:(h + 1) * 4], axis=1).max()
                 * np.linalg.norm(k[:, h * 4:(h + 1) * 4], axis=1).max() for h in range(2))
    assert certificate.radius == pytest.approx(radius, rel=1e-12)
    assert certificate.degree == 4 and certificate.features == 70  # C(4 + 4, 4) symmetric monomials
    assert certificate.valid and certificate.positive and not certificate.vacuous
    assert 0 < np.abs(o - exact).max() <= certificate.output_bound
    assert certificate.sampled_rows == 8 and 0 < certificate.sampled_max_error < 1e-2
    assert "polyattn.Certificate(radius=" in repr(certificate)


def test_paper_gradients_are_within_their_certified_bounds():
    q, k, v, g = random_problem(40, 40, 2, 4, 3, seed=8, scale=0.2)
    _, gradients = reference(q, k, v, 2, causal=False)
    dq, dk, dv, certificate = polyattn.backward(q, k, v, g, method="paper", heads=2, degree=4)
    exact_dq, exact_dk, exact_dv = gradients(g)
    assert not certificate.forward.vacuous
    assert np.abs(dq - exact_dq).max() <= certificate.dq_bound < 0.05 * np.abs(exact_dq).max()
    assert np.abs(dk - exact_dk).max() <= certificate.dk_bound < 0.05 * np.abs(exact_dk).max()
    assert np.abs(dv - exact_dv).max() <= certificate.dv_bound < 0.05 * np.abs(exact_dv).max()
    assert np.isnan(certificate.derivative_error)


def test_options_keep_the_cpp_defaults_and_name_bad_values():
    options = polyattn.Options()
    assert (options.causal, options.heads, options.scale, options.degree, options.polynomial, options.feature_map,
            options.radius, options.range_policy, options.chunk_size, options.estimate_error,
            options.estimate_rows) == (False, 1, None, 2, "taylor", "symmetric", 0.0, "mark_invalid", 0, False, 32)
    assert repr(options).startswith("polyattn.Options(causal=False, heads=1, scale=None, degree=2")
    attention = polyattn.Attention("paper", causal=True, degree=4, feature_map="kronecker", scale=0.5)
    assert attention.method == "paper"
    assert (attention.options.causal, attention.options.degree, attention.options.feature_map,
            attention.options.scale) == (True, 4, "kronecker", 0.5)
    assert polyattn.Attention("adjoint", polyattn.Options(heads=2)).options.heads == 2
    with pytest.raises(ValueError, match="'degree' must be >= 0, got -1"):
        polyattn.Options(degree=-1)
    with pytest.raises(ValueError, match="'heads' must be >= 1, got 0"):
        polyattn.Options(heads=0)
    with pytest.raises(ValueError, match="'scale' must be finite and > 0"):
        polyattn.Options(scale=-1.0)
    with pytest.raises(ValueError, match="argument 'polynomial' must be one of taylor, minimax; got 'chebyshev'"):
        polyattn.Options(polynomial="chebyshev")
    with pytest.raises(ValueError, match="'range_policy' raise_degree needs a 'radius' > 0"):
        polyattn.Options(range_policy="raise_degree")
    with pytest.raises(ValueError, match="must be one of exact_reference, exact_blocked, paper, adjoint; got 'fast'"):
        polyattn.Attention("fast")
    with pytest.raises(TypeError):
        polyattn.Options(degre=3)


def test_bad_arrays_raise_value_or_type_errors_naming_the_argument():
    q, k, v, g = random_problem(8, 8, 1, 4, 4, seed=9)
    attention = polyattn.Attention("exact_blocked")
    with pytest.raises(TypeError, match="argument 'k' must be a float32 or float64 array, got dtype int64"):
        attention.forward(q, k.astype(np.int64), v)
    with pytest.raises(TypeError, match="argument 'q' must be a float32 or float64 array, got dtype float16"):
        attention.forward(q.astype(np.float16), k, v)
    with pytest.raises(TypeError, match="every array must have the dtype of 'q' \\(float64\\), got 'v' of dtype float32"):
        attention.forward(q, k, v.astype(np.float32))
    with pytest.raises(ValueError, match="argument 'q' must be a 2-D .* or 4-D .* array, got 3 dimensions"):
        attention.forward(q[None], k, v)
    with pytest.raises(ValueError, match="arguments 'Q' and 'K' must have the same number of columns, got 4 and 3"):
        attention.forward(q, k[:, :3], v)
    with pytest.raises(ValueError, match="argument 'V' must have as many rows as 'K' \\(8\\), got 7"):
        attention.forward(q, k, v[:7])
    with pytest.raises(ValueError, match="argument 'Q' must be non-empty"):
        attention.forward(q[:0], k, v)
    nan = q.copy()
    nan[2, 1] = np.nan
    with pytest.raises(ValueError, match="argument 'Q' has a non-finite entry \\(nan\\) at \\(2, 1\\)"):
        attention.forward(nan, k, v)
    with pytest.raises(ValueError, match="call forward\\(\\) first"):
        polyattn.Attention("adjoint").backward(q, k, v, q, g)
    attention.forward(q, k, v)
    with pytest.raises(ValueError, match="needs the log-sum-exp of a preceding forward\\(\\) with the same shapes"):
        attention.backward(q[:4], k[:4], v[:4], q[:4], g[:4])


def test_domain_errors_are_arithmetic_errors_with_the_cpp_message():
    q, k, v, _ = random_problem(8, 8, 1, 4, 4, seed=11, scale=3.0)
    assert issubclass(polyattn.DomainError, ArithmeticError)
    with pytest.raises(polyattn.DomainError, match="exceeds 'radius' = 0.5 .*RangePolicy::throw_error"):
        polyattn.forward(q, k, v, method="adjoint", radius=0.5, range_policy="throw_error")
    huge = np.full((8, 4), 3e38, dtype=np.float32)
    with pytest.raises(polyattn.DomainError, match="overflowed float"):
        polyattn.forward(q.astype(np.float32), k.astype(np.float32), huge, method="exact_blocked")


def test_threads_setting_leaves_results_bitwise_unchanged():
    q, k, v, g = random_problem(300, 300, 2, 8, 8, seed=12, dtype=np.float32)
    results = []
    try:
        for threads in (1, 2):
            polyattn.set_num_threads(threads)
            assert polyattn.num_threads() == threads
            results.append(polyattn.backward(q, k, v, g, method="adjoint", heads=2, causal=True)[:3])
        with pytest.raises(ValueError, match="argument 'threads' must be >= 0"):
            polyattn.set_num_threads(-1)
    finally:
        polyattn.set_num_threads(0)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


def test_one_object_used_from_several_python_threads_serialises_its_calls():
    # The GIL is released while C++ computes, so the calls below overlap; the object's lock keeps its workspaces
    # to one call at a time, and every thread gets the single-threaded result.
    q, k, v, g = random_problem(256, 256, 1, 8, 8, seed=13)
    attention = polyattn.Attention("adjoint", causal=True)
    expected, _ = attention.forward(q, k, v)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(attention.forward(q, k, v)[0])
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 15
    for o in results:
        np.testing.assert_array_equal(o, expected)


def test_the_gil_is_released_while_cpp_computes():
    # With the GIL released, the main thread runs from the start of the worker's C++ call; held, it could run only
    # once the call returned (a few microseconds before the worker records the end).
    q, k, v, _ = random_problem(4000, 4000, 1, 16, 16, seed=15)
    attention = polyattn.Attention("exact_blocked")
    started, times = threading.Event(), {}

    def work():
        started.set()
        times["call_start"] = time.perf_counter()
        attention.forward(q, k, v)
        times["call_end"] = time.perf_counter()

    worker = threading.Thread(target=work)
    worker.start()
    started.wait()
    times["main_runs"] = time.perf_counter()
    worker.join()
    assert times["call_end"] - times["main_runs"] > 0.25 * (times["call_end"] - times["call_start"])


@pytest.mark.parametrize("method", ["exact_blocked", "adjoint"])
def test_kept_copies_give_the_same_gradients_and_only_for_the_same_arrays(method):
    # forward(keep_copies=True) keeps its column-major copies of C-ordered q, k, v and o; a backward() on those very
    # arrays reads them instead of copying again, and must give bitwise what a plain forward and backward give. A
    # backward() on other arrays (here with other values in q) must not use them.
    q, k, v, g = random_problem(37, 37, 2, 4, 3, seed=5, dtype=np.float32, scale=0.5)
    attention = polyattn.Attention(method, causal=True, heads=2)
    o_plain, _ = attention.forward(q, k, v)
    plain = attention.backward(q, k, v, o_plain, g)[:3]
    o_kept, _ = attention.forward(q, k, v, keep_copies=True)
    kept = attention.backward(q, k, v, o_kept, g)[:3]
    assert np.array_equal(o_kept, o_plain)
    for a, b in zip(kept, plain):
        assert np.array_equal(a, b)

    # Other memory and values for q and o, the same shapes: after a forward on q, backward() then combines q's saved
    # normalisers with q_other, the same way whether or not that forward kept copies, as long as the kept copies of
    # q and o are not used (those of k and v may be).
    q_other = np.ascontiguousarray(q[::-1])
    o_other, _ = attention.forward(q_other, k, v)
    attention.forward(q, k, v)
    expected = attention.backward(q_other, k, v, o_other, g)[:3]
    attention.forward(q, k, v, keep_copies=True)
    mixed = attention.backward(q_other, k, v, o_other, g)[:3]
    for a, b in zip(mixed, expected):
        assert np.array_equal(a, b)
