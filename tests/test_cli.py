"""The micromoe command: outputs, JSON fields, and one clear error line per bad input."""

import json
import re
import subprocess
import sys

import pytest

from micromoe_megatron import cli

INSTANCE = {"num_gpus": 4, "gpus_per_node": 2,
            "placement": {"kind": "symmetric", "experts": 4, "replicas": 2},
            "tokens": [[10, 0, 3, 1], [5, 5, 5, 5], [0, 0, 40, 0], [1, 2, 3, 4]]}


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path, data, name="instance.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_schedule_json_has_every_documented_field(tmp_path, capsys):
    code, out, _ = run(["schedule", write(tmp_path, INSTANCE), "--json"], capsys)
    assert code == 0
    plan = json.loads(out)
    for field in ("max_load", "mean_load", "imbalance", "lp_optimum", "load_per_gpu", "quota",
                  "routes", "remote_tokens", "schedule_ms", "fallback"):
        assert field in plan
    assert plan["max_load"] == max(plan["load_per_gpu"]) == 26
    assert plan["lp_optimum"] == pytest.approx(25.5)
    assert sum(r[3] for r in plan["routes"]) == 84
    assert plan["fallback"] is False


def test_schedule_with_explicit_holders_and_text_output(tmp_path, capsys):
    instance = {"num_gpus": 2, "holders": [[0, 1], [1]], "tokens": [[6, 0], [0, 2]]}
    code, out, _ = run(["schedule", write(tmp_path, instance)], capsys)
    assert code == 0
    assert "max load 4" in out and "max/mean 1.0000" in out


def test_placement_text_and_json(capsys):
    code, out, _ = run(["placement", "--gpus", "8", "--experts", "16", "--replicas", "2"], capsys)
    assert code == 0
    assert "expert   15" in out and "GPU   7" in out and "Eq. 3 bound" in out
    code, out, _ = run(["placement", "--gpus", "8", "--experts", "8", "--kind", "random", "--seed", "4",
                        "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and len(data["phy2log"]) == 8 and data["eq3_bound_uniform"] == pytest.approx(1.0)


def test_bench_commands_print_tables_and_json(capsys):
    code, out, _ = run(["bench", "balance", "--steps", "2", "--json"], capsys)
    rows = json.loads(out)["rows"]
    assert code == 0 and [r["zipf_s"] for r in rows] == [0.0, 0.5, 0.9, 1.2, 1.5, 2.0]
    assert all(r["symmetric_p50"] <= r["vanilla_p50"] + 1e-9 for r in rows)
    code, out, _ = run(["bench", "schedule", "--steps", "3"], capsys)
    assert code == 0 and "64" in out and "p99" in out


def instance_with(**changes):
    data = json.loads(json.dumps(INSTANCE))
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    return data


@pytest.mark.parametrize("data,message", [
    (instance_with(tokens=[[10, 0, 3, -1], [5, 5, 5, 5], [0, 0, 40, 0], [1, 2, 3, 4]]),
     r"tokens\[0\]\[3\]: counts must be >= 0"),
    (instance_with(tokens=[[1, 2, 3, 4]]), "tokens: expected shape"),
    (instance_with(tokens=[[1, 2], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]), "tokens: rows have different"),
    (instance_with(tokens="many"), "tokens: must be a list"),
    (instance_with(placement=None, holders=[[0], [9], [1], [2]]), r"holders\[1\]: GPU ids"),
    (instance_with(placement=None, holders=[[0], [], [1], [2]]), r"holders\[1\]: expert 1 has no holder"),
    (instance_with(holders=[[0]]), "give exactly one of 'holders' or 'placement'"),
    (instance_with(placement={"kind": "hexagon", "experts": 4, "replicas": 2}), "unknown placement kind"),
    (instance_with(placement={"kind": "symmetric", "experts": 4, "replicas": 3}), "replicas=3 must divide"),
    (instance_with(num_gpus=0), "num_gpus: must be an integer >= 1"),
    (instance_with(num_gpus=None), "num_gpus: missing"),
    (instance_with(gpus_per_node=3), "gpus_per_node must be >= 1 and divide"),
    ("{not json", "is not valid JSON"),
    ([1, 2], "instance: must be a JSON object"),
])
def test_schedule_errors_exit_2_with_one_line_naming_the_field(tmp_path, capsys, data, message):
    code, out, err = run(["schedule", write(tmp_path, data)], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "micromoe schedule: error:" in err
    assert re.search(message, err), err


def test_missing_instance_file(capsys):
    code, _, err = run(["schedule", "/nonexistent/instance.json"], capsys)
    assert code == 2 and "cannot read" in err


@pytest.mark.parametrize("argv,message", [
    (["placement", "--gpus", "8", "--experts", "8", "--kind", "star"], "unknown placement kind 'star'"),
    (["placement", "--gpus", "8", "--experts", "6"], "experts=6 must be divisible by EP"),
    (["placement", "--gpus", "8", "--experts", "8", "--kind", "custom"], "needs a placement file"),
])
def test_placement_errors(capsys, argv, message):
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize("argv,message", [
    (["--micro-batches", "0"], "--micro-batches must be >= 1"),
    (["--micro-ep", "0"], "--micro-ep must be >= 1"),
    (["--ep", "0"], "--ep must be >= 1"),
    (["--variability", "1.5"], "--variability must be in [0, 1]"),
    (["--history-fraction", "-0.1"], "--history-fraction must be in [0, 1)"),
    (["--skew", "-1"], "--skew must be a finite number >= 0"),
])
def test_simulate_errors_name_the_flag(capsys, argv, message):
    code, _, err = run(["simulate", *argv], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,message", [
    (["bench", "paper", "--steps", "0"], "--steps must be >= 1"),
    (["bench", "paper", "--variability", "2"], "--variability must be in [0, 1]"),
    (["bench", "schedule", "--calibrate"], "apply to `bench paper` only"),
    (["simulate", "--history-fraction", "1"], "--history-fraction must be in [0, 1)"),
    (["simulate", "--skew", "nan"], "--skew must be a finite number"),
])
def test_bench_and_simulate_edge_values_are_one_line(capsys, argv, message):
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_schedule_instance_errors_name_the_field(tmp_path, capsys):
    misspelled = {**INSTANCE, "gpus_per_nodes": 2}
    code, _, err = run(["schedule", write(tmp_path, misspelled)], capsys)
    assert code == 2 and "unknown field 'gpus_per_nodes'" in err
    code, _, err = run(["schedule", write(tmp_path, {"num_gpus": 4, "holders": [], "tokens": [[]] * 4})], capsys)
    assert code == 2 and "holders: no experts" in err
    code, _, err = run(["schedule", write(tmp_path, INSTANCE), "--work-limit", str(2**70)], capsys)
    assert code == 2 and "--work-limit must be in [0, 2**62)" in err


def test_schedule_says_when_the_plan_fell_back(tmp_path, capsys):
    code, out, _ = run(["schedule", write(tmp_path, INSTANCE), "--work-limit", "0"], capsys)
    assert code == 0 and "LP optimum not solved: fallback plan" in out and "FALLBACK" in out and "nan" not in out


def test_console_entry_point_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "micromoe_megatron.cli", "placement", "--gpus", "4",
                             "--experts", "4", "--json"], capture_output=True, text=True)
    assert result.returncode == 0 and json.loads(result.stdout)["num_gpus"] == 4
