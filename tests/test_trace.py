"""Regression trace (the one test that compares the code with its own earlier output, see
tests/regression_trace.py): a tiny run on dm_control cartpole-balance, fixed seed, CPU, fp32, one thread,
must give the losses of its first updates and the final weights recorded in tests/data/trace.json.

On a machine whose float arithmetic matches the one that wrote the trace, every loss is
bit-identical and then the weights' digest must be too. Elsewhere (another CPU's kernels may sum in
another order) the losses and the weights' norms must agree to 1e-4 relative."""

import json
import math

import pytest

from regression_trace import CASES, DATA, run_in_subprocess

RECORDED = json.loads(DATA.read_text())


@pytest.mark.parametrize("variant,obs", CASES)
def test_same_trace_as_recorded(variant, obs):
    want, got = RECORDED[f"{variant} {obs}"], run_in_subprocess(variant, obs)
    assert got["parameters"] == want["parameters"]
    assert len(got["updates"]) == len(want["updates"]) == 21       # pretraining + 20 updates
    for step, (g, w) in enumerate(zip(got["updates"], want["updates"])):
        assert g.keys() == w.keys(), step
        for key in w:
            assert math.isclose(g[key], w[key], rel_tol=1e-4, abs_tol=1e-6), (step, key, g[key], w[key])
    for key in ("abs_sum", "square_sum"):
        assert math.isclose(got[key], want[key], rel_tol=1e-4), (key, got[key], want[key])
    if got["updates"] == want["updates"]:            # same arithmetic: the same weights, bit for bit
        assert got["weights"] == want["weights"]
