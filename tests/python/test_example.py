"""A short smoke run of examples/torch_gpt.py (its full run is a few hundred steps; see the README)."""

import os
import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "torch_gpt.py"


def test_torch_gpt_example_runs_every_attention_and_reports_the_exact_runs_agreement():
    result = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "3", "--batch", "2", "--context", "32",
                             "--d-model", "16", "--heads", "2", "--log-every", "1"],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    for label in ("torch exact", "polyattn exact", "polyattn adjoint g=2"):
        assert f"[{label:<20}] step    3/3" in result.stdout
    # float32 rounding (2^-24 ~ 6e-8 per operation) in another order, over 3 steps: far below 1e-5.
    difference = result.stdout.split("final training loss differs by ")[1].split()[0]
    assert float(difference) < 1e-5
