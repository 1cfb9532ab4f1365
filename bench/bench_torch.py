#!/usr/bin/env python3
"""Forward+backward of polyattn.torch against PyTorch's attention on the CPU: float32, (1, 1, n, 16) tensors,
one thread for torch and for polyattn, default scale 1/sqrt(16). Prints JSON.

    PYTHONPATH=build/release/python /usr/bin/python3 bench/bench_torch.py \\
        [--repetitions 7] [--cpp-bench build/release/bench/polyattn_bench] [--quick]

Each case is timed as one warm-up call, then `--repetitions` calls, the cases of one comparison interleaved
(A B C A B C ...) so that a change of machine load hits all of them; the figures are medians of wall-clock time
(`wall_ms`) and of the process's CPU time (`cpu_ms`). Gradients are dropped (set to None) before each call, as
`optimizer.zero_grad()` does.

Comparisons (the issue-11 targets):
  exact, n = 8192: torch's exact attention (softmax(q k^T / sqrt(d)) v with autograd; torch 1.13 has no
      scaled_dot_product_attention) against polyattn's exact_blocked, and its adjoint for reference;
      target exact_blocked >= 5x faster, non-causal.
  taylor, n = 65536: a Taylor-2 linear attention written in torch with autograd (the feature map of Based's
      TaylorExp, 1 + 16 + 256 features, whose kernel is 1 + s + s^2/2 with s = q.k / sqrt(d), exactly polyattn's
      degree-2 Taylor polynomial; causal by cumulative sums of the n x 273 x 16 outer products, as Based's and
      fast-transformers' reference code does without a custom kernel) against polyattn's adjoint with degree 2
      (symmetric features, r = 153; the Kronecker features of the baseline, r = 273, for reference);
      target adjoint >= 100x faster, causal. The causal baseline needs about 5 GiB.
  overhead, n = 65536: polyattn.torch's adjoint against the same C++ backend timed inside the extension module
      (Attention._time_forward_backward: the C++ forward and backward in a loop on copies of the same inputs, no
      Python, after an untimed call so that its outputs and workspaces are in memory, as in Google Benchmark's
      iterations): the binding's overhead, target <= 5%. Two input layouts, each against the C++ call on its
      layout: the usual contiguous tensors, row-major matrices that the adjoint reads and writes in place (its
      kernel transposes each chunk of rows in cache), and tensors whose memory is column-major ((1, 1, 16, n)
      transposed). The contiguous case is also reported against the column-major C++ call: the cost of the layout.
      With --cpp-bench, polyattn_bench's adjoint/causal:C/g:2/d:16/n:65536/threads:1/real_time is run as well (another
      process and binary: same kernel and cost; its inputs have scale 1 and q, k / sqrt(d)).

--quick divides every n by 4 (a smoke run; the targets are not meant for it).
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import polyattn
import polyattn.torch

D = 16


def torch_exact_attention(q, k, v, causal):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[-2]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def taylor_features(x):
    """Based's TaylorExp: phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(d)."""
    d = x.shape[-1]
    second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2) / math.sqrt(2)
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, second / math.sqrt(d)], dim=-1)


def torch_taylor_attention(q, k, v, causal):
    fq, fk = taylor_features(q), taylor_features(k)
    if causal:
        states = torch.cumsum(fk.unsqueeze(-1) * v.unsqueeze(-2), dim=2)  # (b, h, n, r, d_v)
        numerator = (fq.unsqueeze(-1) * states).sum(dim=-2)
        denominator = (fq * fk.cumsum(dim=2)).sum(dim=-1, keepdim=True)
    else:
        numerator = fq @ (fk.transpose(-1, -2) @ v)
        denominator = fq @ fk.sum(dim=2).unsqueeze(-1)
    return numerator / denominator


def inputs(n, seed, column_major=False):
    generator = torch.Generator().manual_seed(seed)
    if column_major:  # memory (1, 1, 16, n): the column-major n x 16 matrices of the C++ API
        return [torch.randn(1, 1, D, n, generator=generator).transpose(-1, -2) for _ in range(4)]
    return [torch.randn(1, 1, n, D, generator=generator) for _ in range(4)]


def autograd_case(function, n, seed=1, column_major=False):
    """A callable running forward+backward of function(q, k, v) with fresh gradients."""
    q, k, v, g = inputs(n, seed, column_major)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def run():
        for t in leaves:
            t.grad = None
        function(*leaves).backward(g)

    return run


def cpp_case(n, causal, seed=1, row_major=False):
    """The C++ forward+backward timed in the extension without Python, on column-major or row-major matrices; run()
    returns its (wall, CPU) seconds."""
    q, k, v, g = (t[0, 0].numpy() for t in inputs(n, seed))
    attention = polyattn.Attention("adjoint", causal=causal)
    return lambda: attention._time_forward_backward(q, k, v, g, 1, row_major=row_major)[0]


def measure(cases, repetitions):
    """Interleaved timing of {name: run}; a run returning (wall, cpu) seconds reports its own time."""
    times = {name: {"wall": [], "cpu": []} for name in cases}
    for _ in range(repetitions + 1):  # the first round warms up
        for name, run in cases.items():
            wall, cpu = time.perf_counter(), time.process_time()
            reported = run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if reported is not None:
                wall, cpu = reported
            times[name]["wall"].append(1e3 * wall)
            times[name]["cpu"].append(1e3 * cpu)
    return [{"name": name, "wall_ms": statistics.median(t["wall"][1:]), "cpu_ms": statistics.median(t["cpu"][1:]),
             "wall_ms_all": [round(x, 3) for x in t["wall"][1:]]} for name, t in times.items()]


def cpp_bench(path, repetitions, n):
    """Median real time (ms) of polyattn_bench's adjoint forward+backward at n, one thread, per causal flag."""
    result = subprocess.run([path, f"--benchmark_filter=^adjoint/causal:[01]/g:2/d:16/n:{n}/threads:1/real_time$",
                             f"--benchmark_repetitions={repetitions}", "--benchmark_report_aggregates_only=true",
                             "--benchmark_format=json"], capture_output=True, text=True, check=True)
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
    return [{"name": f"polyattn_bench/{b['run_name']}", "wall_ms": b["real_time"] * scale[b["time_unit"]],
             "cpu_ms": b["cpu_time"] * scale[b["time_unit"]]}
            for b in json.loads(result.stdout)["benchmarks"] if b.get("aggregate_name") == "median"]


def check_baselines():
    """The baselines compute the functions they are compared with: torch's exact attention is polyattn's exact one,
    the Taylor-2 linear attention polyattn's degree-2 adjoint forward (float64, n = 200, to 1e-12)."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 200, D, generator=generator, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        pairs = [(torch_exact_attention(q, k, v, causal),
                  polyattn.torch.attention(q, k, v, method="exact_blocked", causal=causal)),
                 (torch_taylor_attention(q, k, v, causal),
                  polyattn.torch.attention(q, k, v, method="adjoint", causal=causal))]
        for baseline, polyattn_output in pairs:
            error = ((baseline - polyattn_output).abs().max() / polyattn_output.abs().max()).item()
            if not error < 1e-12:
                raise AssertionError(f"a baseline does not compute polyattn's function (causal={causal}): "
                                     f"relative difference {error}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--cpp-bench", help="path of polyattn_bench, to time the same call in a C++ binary too")
    parser.add_argument("--quick", action="store_true", help="every n divided by 4 (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    polyattn.set_num_threads(1)
    check_baselines()
    shrink = 4 if args.quick else 1
    n_exact, n_taylor = 8192 // shrink, 65536 // shrink
    attention = polyattn.torch.attention
    load_before = os.getloadavg()

    results, ratios = [], []

    def ratio(name, numerator, denominator, at_least=None, overhead_at_most=None):
        """numerator / denominator of wall-clock medians; an overhead is reported as that minus 1."""
        by_name = {r["name"]: r for r in results}
        value = by_name[numerator]["wall_ms"] / by_name[denominator]["wall_ms"]
        entry = {"name": name, "of": f"{numerator} / {denominator} (wall)"}
        if name.startswith("binding_overhead"):
            entry["value"] = value - 1
            if overhead_at_most is not None:
                entry.update(target=f"<= {overhead_at_most:.0%}", met=value - 1 <= overhead_at_most)
        else:
            entry["value"] = value
            if at_least is not None:
                entry.update(target=f">= {at_least}", met=value >= at_least)
        ratios.append(entry)

    for causal in (0, 1):
        cases = {
            f"torch_exact/causal:{causal}/n:{n_exact}":
                autograd_case(lambda q, k, v: torch_exact_attention(q, k, v, causal), n_exact),
            f"polyattn_exact_blocked/causal:{causal}/n:{n_exact}":
                autograd_case(lambda q, k, v: attention(q, k, v, method="exact_blocked", causal=causal), n_exact),
            f"polyattn_adjoint/causal:{causal}/n:{n_exact}":
                autograd_case(lambda q, k, v: attention(q, k, v, method="adjoint", causal=causal), n_exact),
        }
        results += measure(cases, args.repetitions)
        ratio(f"exact_blocked_speedup_over_torch_exact/causal:{causal}/n:{n_exact}",
              f"torch_exact/causal:{causal}/n:{n_exact}", f"polyattn_exact_blocked/causal:{causal}/n:{n_exact}",
              at_least=5 if causal == 0 else None)
        ratio(f"adjoint_speedup_over_torch_exact/causal:{causal}/n:{n_exact}",
              f"torch_exact/causal:{causal}/n:{n_exact}", f"polyattn_adjoint/causal:{causal}/n:{n_exact}")

    for causal in (0, 1):
        cases = {
            f"torch_taylor2/causal:{causal}/n:{n_taylor}":
                autograd_case(lambda q, k, v: torch_taylor_attention(q, k, v, causal), n_taylor),
            f"polyattn_adjoint/causal:{causal}/n:{n_taylor}":
                autograd_case(lambda q, k, v: attention(q, k, v, method="adjoint", causal=causal), n_taylor),
            f"polyattn_adjoint_kronecker/causal:{causal}/n:{n_taylor}":
                autograd_case(lambda q, k, v: attention(q, k, v, method="adjoint", causal=causal,
                                                        feature_map="kronecker"), n_taylor),
            f"polyattn_adjoint_column_major/causal:{causal}/n:{n_taylor}":
                autograd_case(lambda q, k, v: attention(q, k, v, method="adjoint", causal=causal), n_taylor,
                              column_major=True),
            f"cpp_adjoint/causal:{causal}/n:{n_taylor}": cpp_case(n_taylor, causal),
            f"cpp_adjoint_row_major/causal:{causal}/n:{n_taylor}": cpp_case(n_taylor, causal, row_major=True),
        }
        results += measure(cases, args.repetitions)
        ratio(f"adjoint_speedup_over_torch_taylor2/causal:{causal}/n:{n_taylor}",
              f"torch_taylor2/causal:{causal}/n:{n_taylor}", f"polyattn_adjoint/causal:{causal}/n:{n_taylor}",
              at_least=100 if causal == 1 else None)
        # The binding's overhead: polyattn.torch against the C++ call it makes, on the same memory layout.
        for layout, cpp in (("", "_row_major"), ("_column_major", "")):
            ratio(f"binding_overhead{layout}/causal:{causal}/n:{n_taylor}",
                  f"polyattn_adjoint{layout}/causal:{causal}/n:{n_taylor}",
                  f"cpp_adjoint{cpp}/causal:{causal}/n:{n_taylor}", overhead_at_most=0.05)
        # What torch's row-major layout costs in all: polyattn.torch on contiguous tensors against the C++ call on
        # column-major matrices.
        ratio(f"binding_overhead_contiguous_vs_column_major_cpp/causal:{causal}/n:{n_taylor}",
              f"polyattn_adjoint/causal:{causal}/n:{n_taylor}", f"cpp_adjoint/causal:{causal}/n:{n_taylor}")

    if args.cpp_bench:
        results += cpp_bench(args.cpp_bench, args.repetitions, n_taylor)
        for causal in (0, 1):
            ratio(f"binding_overhead_vs_polyattn_bench/causal:{causal}/n:{n_taylor}",
                  f"polyattn_adjoint/causal:{causal}/n:{n_taylor}",
                  f"polyattn_bench/adjoint/causal:{causal}/g:2/d:16/n:{n_taylor}/threads:1/real_time")

    print(json.dumps({
        "context": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
                    "processor": platform.processor() or platform.machine(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "polyattn_module": polyattn._core.__file__,
                    "threads": {"torch": torch.get_num_threads(), "polyattn": polyattn.num_threads()},
                    "dtype": "float32", "shape": "(1, 1, n, 16)", "repetitions": args.repetitions,
                    "quick": args.quick, "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "benchmarks": results,
        "ratios": ratios,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
