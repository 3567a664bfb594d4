"""scripts/gpu_bench.sh's Python on the CPU (smoke sizes): it runs, its JSON feeds the cost model,
and MicroEP's dispatch keeps its extra memory linear in the routed tokens (issue 14, point 5)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from micromoe_megatron.sim.cost import calibrate_from_gpu_bench
from micromoe_megatron.sim.paper import PAPER_MODELS

TOKENS, EXPERTS, REPLICAS, TOP_K, HIDDEN = 1024, 64, 4, 2, 8


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_bench") / "bench.json"
    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_bench.sh"
    flags = ["--cpu-smoke", "--tokens", TOKENS, "--experts", EXPERTS, "--ep", 2, "--replicas", REPLICAS,
             "--top-k", TOP_K, "--hidden", HIDDEN, "--repeats", 1, "--gemm-tokens", 16, 64]
    subprocess.run(["bash", str(script), str(path), *map(str, flags)], check=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    return json.loads(path.read_text())


def test_cpu_smoke_reports_every_measurement(bench):
    (case,) = bench["cases"]
    assert case["tokens"] == TOKENS and case["replicas"] == REPLICAS
    for key in ("dispatch_ms_stock", "dispatch_ms_micro_ep", "preprocess_ms_cached_plan", "plan_ms_overlapped",
                "plan_ms_serial"):
        assert case[key] > 0, key
    assert case["exposed_plan_ms_overlapped"] >= 0 and case["exposed_plan_ms_serial"] >= 0
    assert [row["tokens"] for row in bench["gemm"]["rows"]] == [16, 64]


def test_dispatch_extra_memory_is_linear_in_routed_tokens(bench):
    """No [T, d*E] or [T, E, D] intermediate: the extra bytes over stock stay below one int64 per
    physical (token, slot) pair by a wide margin, and within the chunk sort's copy of the routed
    tokens and probs (fp32 here) plus small tables."""
    extra = bench["cases"][0]["extra_bytes"]
    routed = TOKENS * TOP_K
    assert extra <= routed * (HIDDEN * 4 + 4) + 64 * 1024, extra
    assert extra < TOKENS * EXPERTS * REPLICAS * 8 / 4, extra


def test_cost_model_takes_the_measured_gemm(bench):
    shape = PAPER_MODELS[0]
    cost = calibrate_from_gpu_bench(bench, shape)
    measured = [row["tflops"] for row in bench["gemm"]["rows"]]
    assert min(measured) <= cost.expert_tflops <= max(measured)
    assert "gpu_bench" in cost.source
    with pytest.raises(ValueError, match="gpu_bench.sh OUT.json"):
        calibrate_from_gpu_bench({"gemm": {"rows": []}}, shape)
    for bad in ([1, 2], {"gemm": {"rows": [{"tokens": 16, "tflops": 0}]}},
                {"gemm": {"rows": [{"tokens": 16, "tflops": -5}]}}, {"gemm": {"rows": [{"tokens": 16}]}}):
        with pytest.raises(ValueError, match="gpu_bench.sh OUT.json"):
            calibrate_from_gpu_bench(bad, shape)


def test_bench_paper_projects_from_the_measured_gemm_file(bench, tmp_path, capsys):
    from micromoe_megatron import cli

    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    assert cli.main(["bench", "paper", "--steps", "2", "--gemm-file", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert any("measured by gpu_bench" in line for line in result["cost_model"])
    assert cli.main(["bench", "paper", "--gemm-file", str(tmp_path / "missing.json")]) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert "--gemm-file" in error and "gpu_bench.sh OUT.json" in error
