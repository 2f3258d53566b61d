"""The benchmark's smoke test: structure of a quick run, and fml's timed step
computing what the hand-written pure-JAX reference computes."""

import argparse

import numpy as np
import pytest

import benchmarks as bench
from benchmarks import _jax_peers, _workloads
from fml.errors import UnknownNameError


def test_fml_mlp_step_matches_pure_jax():
    workload = _workloads.shrink(_workloads.WORKLOADS["mlp"])
    x, y = _workloads.synthetic_data(workload)
    fml_loss, ref_loss, param_diff = _jax_peers.first_step_agreement(workload, x, y)
    # Untrained 10-class net on random labels: loss near log(10).
    assert abs(fml_loss - np.log(10)) < 0.5
    np.testing.assert_allclose(fml_loss, ref_loss, rtol=1e-5)
    assert param_diff < 1e-6  # the same Adam update


def test_quick_run_structure():
    frameworks = ("fml per-step", "fml fused epoch", "PyTorch eager")
    results = bench.run(
        quick=True,
        workloads=("mlp",),
        frameworks=frameworks,
        repeats=5,
        sections=("throughput",),
        log=lambda *_: None,
    )
    rows = results["throughput"]
    assert [r["framework"] for r in rows] == list(frameworks)
    for r in rows:
        assert len(r["seconds"]) == 5 and all(s > 0 for s in r["seconds"])
        assert r["samples"] == 2 * 128 and r["samples_per_s"] > 0
    assert results["matmul_peak_gflops"] > 0.1
    markdown = results["markdown"]
    assert "| mlp | fml fused epoch |" in markdown and "Goals:" in markdown
    assert "- mlp: fml" in markdown and "PyTorch eager = " in markdown


def test_recurrent_gemm_section_compares_the_same_computation():
    results = bench.run(quick=True, sections=("recurrent",), log=lambda *_: None)
    gemm = results["recurrent_gemm_gflops"]
    assert sorted(gemm) == ["PyTorch", "XLA"] and all(v > 0.1 for v in gemm.values())
    assert (
        "recurrent matmul alone (28 dependent [128, 128] x [128, 512] steps)"
        in (results["markdown"])
    )


def test_bench_checks_names():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--models", "resnet"])
    assert args.quick is False and args.repeats == 7
    with pytest.raises(UnknownNameError, match="resnet"):
        bench.main(args)
    args = parser.parse_args(["--quick", "--repeats", "5", "--models", "mlp"])
    assert (args.quick, args.repeats, args.models) == (True, 5, "mlp")
