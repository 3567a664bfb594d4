"""The ``micromoe`` command: schedule, placement, bench, analyze, simulate, report, prepare-data.

Errors in the input exit with status 2 and one line naming the offending field or flag.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from .core import placement
from .sim import bench
from .core.loads import validate_counts
from .core.placement import validate_holders
from .core.schedule import DEFAULT_WORK_LIMIT, ReplicaScheduler


class InputError(ValueError):
    """Bad user input; the message names the field."""


def _int_field(data: dict, name: str, minimum: int = 1, required: bool = True) -> int | None:
    if name not in data:
        if required:
            raise InputError(f"{name}: missing (an integer >= {minimum})")
        return None
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


def _known_fields(where: str, data: dict, known: tuple[str, ...]) -> None:
    """A misspelled field would silently fall back to its default: refuse it by name."""
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(known)}")


def load_instance(data) -> tuple[tuple[tuple[int, ...], ...], np.ndarray, int, int | None]:
    """Parse a schedule instance (see README) into (holders, tokens [F, E], F, gpus_per_node)."""
    if not isinstance(data, dict):
        raise InputError("instance: must be a JSON object")
    _known_fields("instance", data, ("num_gpus", "gpus_per_node", "holders", "placement", "tokens"))
    num_gpus = _int_field(data, "num_gpus")
    gpus_per_node = _int_field(data, "gpus_per_node", required=False)
    if ("holders" in data) == ("placement" in data):
        raise InputError("holders/placement: give exactly one of 'holders' or 'placement'")
    if "holders" in data:
        holders = data["holders"]
        if not isinstance(holders, list) or not all(isinstance(h, list) for h in holders):
            raise InputError("holders: must be a list of GPU lists, one per expert")
        if not all(isinstance(g, int) and not isinstance(g, bool) for h in holders for g in h):
            raise InputError("holders: GPU ids must be integers")
    else:
        spec = data["placement"]
        if not isinstance(spec, dict):
            raise InputError("placement: must be an object {kind, experts, replicas, seed}")
        _known_fields("placement", spec, ("kind", "experts", "replicas", "seed", "file"))
        kind = spec.get("kind", "symmetric")
        try:
            layout = placement.make_placement(
                kind, num_gpus, _int_field(spec, "experts"), _int_field(spec, "replicas"),
                seed=_int_field(spec, "seed", minimum=0, required=False) or 0, path=spec.get("file"))
        except placement.PlacementError as exc:
            raise InputError(f"placement: {exc}") from exc
        holders = layout.holders
    try:
        holders = validate_holders(holders, num_gpus)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    tokens = data.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(row, list) for row in tokens):
        raise InputError("tokens: must be a list of per-expert count lists, one per source GPU")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for row in tokens for v in row):
        raise InputError("tokens: counts must be numbers")
    if len({len(row) for row in tokens}) > 1:
        raise InputError("tokens: rows have different lengths")
    try:
        tokens = validate_counts(np.array(tokens), num_gpus, len(holders))
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    return holders, tokens, num_gpus, gpus_per_node


def _read_json(path: str):
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise InputError(f"INSTANCE: cannot read {path}: {exc.strerror}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"INSTANCE: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def cmd_schedule(args) -> None:
    if args.work_limit is not None and not 0 <= args.work_limit < 2**62:
        raise InputError(f"--work-limit must be in [0, 2**62) (0: always the fallback plan), got {args.work_limit}")
    holders, tokens, num_gpus, gpus_per_node = load_instance(_read_json(args.instance))
    try:
        scheduler = ReplicaScheduler(holders, num_gpus, gpus_per_node=gpus_per_node,
                                     work_limit=args.work_limit, solve_lp=True)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    scheduler.plan(tokens)  # the process's first plan loads the compiled kernels (~0.3 s): not the plan's time
    plan = scheduler.plan(tokens)  # a pure function of the counts: the same plan
    if args.json:
        print(json.dumps(plan.to_json()))
        return
    print(f"{num_gpus} GPUs, {len(holders)} experts, {int(tokens.sum())} token-expert assignments")
    optimum = "not solved: fallback plan" if math.isnan(plan.lp_optimum) else f"{plan.lp_optimum:.2f}"
    print(f"max load {plan.max_load} (LP optimum {optimum}), mean {plan.mean_load:.2f}, "
          f"max/mean {plan.imbalance:.4f}")
    print(f"load per GPU: {plan.load_per_gpu.tolist()}")
    print(f"remote tokens {plan.remote_tokens} ({plan.remote_tokens / max(tokens.sum(), 1):.1%}), "
          f"{len(plan.routes)} routes, scheduled in {plan.schedule_ms:.3f} ms"
          + (f"; FALLBACK: {plan.fallback_reason}" if plan.fallback else ""))


def cmd_placement(args) -> None:
    try:
        layout = placement.make_placement(args.kind, args.gpus, args.experts, args.replicas,
                                          seed=args.seed, path=args.file)
    except placement.PlacementError as exc:
        raise InputError(str(exc)) from exc
    uniform = np.ones(layout.num_experts)
    bound = placement.max_induced_density(layout.holders, uniform, layout.num_gpus) \
        if layout.num_gpus <= 16 else None
    if args.json:
        print(json.dumps({**layout.to_json(), "eq3_bound_uniform": bound,
                          "mean_load_uniform": layout.num_experts / layout.num_gpus}))
        return
    print(f"{args.kind} placement: {layout.num_gpus} GPUs x {layout.slots_per_gpu} slots, "
          f"{layout.num_experts} experts, replicas per expert {sorted(set(layout.logcnt.tolist()))}")
    print("holders per expert:")
    for e, gpus in enumerate(layout.holders):
        print(f"  expert {e:>4}: slot {int(layout.expert_slot[e]):>3}, GPUs {list(gpus)}")
    print("slot table (phy2log, one row per GPU):")
    for g in range(layout.num_gpus):
        print(f"  GPU {g:>3}: {layout.phy2log[g].tolist()}")
    if bound is not None:
        print(f"Eq. 3 bound for uniform load (1 token per expert): max GPU load {bound:.4f}, "
              f"mean {layout.num_experts / layout.num_gpus:.4f}")
    else:
        print("Eq. 3 bound: exact enumeration only for <= 16 GPUs")


def _progress(args):
    return None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))


def _model(name: str):
    from .sim.paper import PAPER_MODELS

    for shape in PAPER_MODELS:
        if shape.name.lower().replace(" ", "-") == name.lower().replace(" ", "-"):
            return shape
    choices = ", ".join(m.name.replace(" ", "-") for m in PAPER_MODELS)
    raise InputError(f"--model {name!r}: choose one of {choices}")


def _cost(args, shape):
    """The cost model: defaults, ``--calibrate`` (GEMMs on this machine) or ``--gemm-file`` (the
    grouped GEMMs ``scripts/gpu_bench.sh`` measured on a GPU, at this shape's tokens per GPU)."""
    from .sim.cost import CostModel, calibrate_from_gpu_bench, calibrate_gemm

    if args.gemm_file:
        if args.calibrate:
            raise InputError("--gemm-file and --calibrate: give one (measured GPU GEMMs, or this machine's)")
        try:
            return calibrate_from_gpu_bench(args.gemm_file, shape)
        except OSError as exc:
            raise InputError(f"--gemm-file {args.gemm_file}: cannot read it ({exc.strerror}); write one with "
                             "scripts/gpu_bench.sh OUT.json") from None
        except ValueError as exc:  # json.JSONDecodeError included
            detail = str(exc).removeprefix(f"{args.gemm_file}: ")
            if "gpu_bench.sh" not in detail:
                detail += "; write one with scripts/gpu_bench.sh OUT.json"
            raise InputError(f"--gemm-file {args.gemm_file}: not a gpu_bench result: {detail}") from None
    return calibrate_gemm(shape) if args.calibrate else CostModel()


def cmd_analyze(args) -> None:
    from .sim import analyze as analysis
    from .sim.counts import TraceError, read_routing

    try:
        counts = read_routing(args.trace, args.experts)
        result = analysis.analyze(counts, args.ep, args.micro_ep, args.placement, args.seed, args.gpus_per_node,
                                  progress=_progress(args), replacement_interval=args.replacement_interval,
                                  replacement_threshold=args.replacement_threshold, bounds=args.bounds)
        plots = analysis.write_plots(result, args.plot_dir, args.plot_layer, args.plot_step) if args.plot_dir else []
    except TraceError as exc:
        raise InputError(str(exc)) from exc
    if args.json:
        print(json.dumps({**analysis.public_json(result), "plots": [str(p) for p in plots]}))
        return
    print(analysis.format_analysis(result))
    for path in plots:
        print(f"plot: {path}")


def _check_share(flag: str, value: float) -> None:
    if not 0 <= value <= 1:  # also refuses NaN
        raise InputError(f"{flag} must be in [0, 1], got {value}")


def cmd_simulate(args) -> None:
    import dataclasses

    from .sim.counts import TraceError, read_routing, synthetic_counts
    from .sim.simulate import format_results, simulate

    shape = _model(args.model)
    for flag, value in (("--ep", args.ep), ("--micro-ep", args.micro_ep), ("--micro-batches", args.micro_batches)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    _check_share("--variability", args.variability)
    if not 0 <= args.history_fraction < 1:
        raise InputError(f"--history-fraction must be in [0, 1) (the rest is evaluated), got {args.history_fraction}")
    if not (math.isfinite(args.skew) and args.skew >= 0):
        raise InputError(f"--skew must be a finite number >= 0, got {args.skew}")
    shape = dataclasses.replace(shape, ep=args.ep or shape.ep, micro_ep=args.micro_ep or shape.micro_ep)
    if args.replacement_interval is not None and args.replacement_interval < 1:
        raise InputError(f"--replacement-interval must be >= 1 micro-batch, got {args.replacement_interval}")
    if args.replacement_threshold < 0:
        raise InputError(f"--replacement-threshold must be >= 0, got {args.replacement_threshold}")
    try:
        if args.input:
            counts = read_routing(args.input, args.experts)
            shape = dataclasses.replace(shape, num_experts=counts.num_experts)
        else:
            counts = synthetic_counts(args.synthetic, args.skew, shape.dp, shape.num_experts,
                                      shape.tokens_per_gpu * shape.top_k, args.micro_batches,
                                      variability=args.variability, seed=args.seed)
        cost = _cost(args, shape)
        results = simulate(counts, shape, cost, history_fraction=args.history_fraction, seed=args.seed,
                           progress=_progress(args), replacement_interval=args.replacement_interval,
                           replacement_threshold=args.replacement_threshold)
    except (TraceError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    if args.json:
        print(json.dumps({"model": shape.name, "cost_model": cost.describe(),
                          "results": [r.to_json() for r in results]}))
        return
    print("\n".join(cost.describe()))
    print(f"model {shape.name}: {shape.num_layers} layers, PP {shape.pp}, EP {shape.ep}, MicroEP d = {shape.micro_ep}, "
          f"{shape.micro_batches_per_step} micro-batches per step")
    print(format_results(results))


def cmd_bench(args) -> None:
    progress = _progress(args)
    if args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    if args.what != "paper" and (args.gemm_file or args.calibrate):
        raise InputError(f"--gemm-file and --calibrate apply to `bench paper` only, not `bench {args.what}`")
    if args.what == "paper":
        _check_share("--variability", args.variability)
        from .sim.paper import PAPER_MODELS, bench_paper, format_paper

        cost = (lambda shape: _cost(args, shape)) if args.gemm_file else _cost(args, PAPER_MODELS[0])
        result = bench_paper(micro_batches=args.steps, variability=args.variability, cost=cost, progress=progress)
        print(json.dumps(result) if args.json else format_paper(result))
        return
    if args.what == "schedule":
        result = bench.bench_schedule(steps=args.steps, progress=progress)
        text = bench.format_schedule
    else:
        for flag, value in (("--gpus", args.gpus), ("--experts", args.experts), ("--replicas", args.replicas),
                            ("--replacement-interval", args.replacement_interval)):
            if value < 1:
                raise InputError(f"{flag} must be >= 1, got {value}")
        if not 0.0 < args.drift <= 1.0:
            raise InputError(f"--drift must lie in (0, 1], got {args.drift}")
        try:
            placement.symmetric(args.gpus, args.experts, args.replicas)
        except placement.PlacementError as exc:
            raise InputError(f"--gpus/--experts/--replicas: {exc}") from exc
        skews = bench.BALANCE_SKEWS if args.skews is None else args.skews
        result = bench.bench_balance(steps=args.steps, skews=skews, num_gpus=args.gpus, num_experts=args.experts,
                                     replicas=args.replicas, drift=args.drift,
                                     replacement_interval=args.replacement_interval, progress=progress)
        text = bench.format_balance
    print(json.dumps(result) if args.json else text(result))


def cmd_report(args) -> None:
    from .training import report as training_report

    try:
        records = training_report.read_records(args.metrics)
        summary = training_report.summarise(records)
        plot = training_report.plot_last_loads(records, args.plot, args.layer) if args.plot else None
    except training_report.ReportError as exc:
        raise InputError(str(exc)) from exc
    if args.json:
        print(json.dumps({**summary, "plot": str(plot) if plot else None}))
        return
    print(training_report.format_report(summary))
    if plot:
        print(f"  per-GPU load plot: {plot}")


def cmd_prepare_data(args) -> None:
    from .training import prepare_data  # imports megatron-core (torch) only when used

    try:
        result = prepare_data.prepare(args.inputs, args.output_prefix, tokenizer=args.tokenizer,
                                      vocab_size=args.vocab_size, tokenizer_out=args.tokenizer_out,
                                      json_key=args.json_key, pattern=args.glob, eod_token=args.eod_token,
                                      progress=_progress(args))
    except prepare_data.DataError as exc:
        raise InputError(str(exc)) from exc
    print(json.dumps(result.to_json()) if args.json else prepare_data.format_result(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="micromoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("schedule", help="plan one micro-batch of one layer from a JSON instance")
    p.add_argument("instance", help="instance JSON file ('-' for stdin); see README")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--work-limit", type=int, default=DEFAULT_WORK_LIMIT,
                   help="planner steps (augmenting paths) before the fallback plan")
    p.set_defaults(run=cmd_schedule)

    p = sub.add_parser("placement", help="show a placement: holders, slot table, Eq. 3 bound")
    p.add_argument("--gpus", type=int, required=True, help="F, GPUs in the MicroEP group")
    p.add_argument("--experts", type=int, required=True, help="E, logical experts")
    p.add_argument("--replicas", type=int, default=2, help="d, replicas per expert")
    p.add_argument("--kind", default="symmetric", help="symmetric | random | custom")
    p.add_argument("--seed", type=int, default=0, help="seed for --kind random")
    p.add_argument("--file", help="phy2log JSON for --kind custom")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_placement)

    p = sub.add_parser("bench", help="benchmarks: planning core (schedule, balance), paper models (paper)")
    p.add_argument("what", choices=["schedule", "balance", "paper"])
    p.add_argument("--steps", type=int, default=None, help="steps (micro-batches) per configuration")
    p.add_argument("--variability", type=float, default=0.3,
                   help="paper: share of each micro-batch's expert popularity redrawn (0..1)")
    p.add_argument("--calibrate", action="store_true", help="paper: measure GEMM throughput on this machine")
    p.add_argument("--gemm-file", metavar="JSON",
                   help="paper: grouped-GEMM throughput measured on a GPU by scripts/gpu_bench.sh OUT.json")
    p.add_argument("--gpus", type=int, default=8, help="balance: F, GPUs in the MicroEP group")
    p.add_argument("--experts", type=int, default=32, help="balance: E, experts")
    p.add_argument("--replicas", type=int, default=2, help="balance: d, replicas per expert")
    p.add_argument("--skews", type=float, nargs="+", help="balance: Zipf skews (default 0 0.5 0.9 1.2 1.5 2)")
    p.add_argument("--drift", type=float, default=0.005,
                   help="balance: popularity drift per step, in (0, 1] (1 = independent draws)")
    p.add_argument("--replacement-interval", type=int, default=1,
                   help="balance: micro-batches between adaptive re-placement checks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("analyze", help="GPU max/mean per layer and micro-batch, vanilla EP vs MicroEP, "
                                       "from Megatron routing traces or a counts file")
    p.add_argument("trace", help="--moe-routing-trace-path directory, or a counts .json/.npz (see README)")
    p.add_argument("--experts", type=int, help="E, experts per layer (required for trace directories)")
    p.add_argument("--ep", type=int, required=True, help="vanilla expert-parallel size")
    p.add_argument("--micro-ep", type=int, required=True, help="d, EP groups merged into a MicroEP group")
    p.add_argument("--placement", default="symmetric",
                   help="symmetric | random | adaptive (start symmetric, re-place from the micro-batches seen)")
    p.add_argument("--replacement-interval", type=int, default=1,
                   help="adaptive: micro-batches between re-placement checks")
    p.add_argument("--replacement-threshold", type=float, default=0.0,
                   help="adaptive: re-place only when predicted max/mean improves by more (0 = at every check)")
    p.add_argument("--bounds", action="store_true",
                   help="adaptive: also print hindsight (non-causal) bounds: window and micro-batch oracles, "
                        "replica floors (slow: a placement search per interval and per micro-batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random placement")
    p.add_argument("--gpus-per-node", type=int, help="for same-node-first routing")
    p.add_argument("--plot-dir", help="write PNG plots here")
    p.add_argument("--plot-layer", type=int, help="layer of the per-GPU load plot (default: first)")
    p.add_argument("--plot-step", type=int, default=0, help="micro-batch of the per-GPU load plot")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_analyze)

    p = sub.add_parser("simulate", help="MoE-layer and step time per balancing strategy (cost model)")
    p.add_argument("input", nargs="?", help="trace directory or counts file (default: synthetic routing)")
    p.add_argument("--experts", type=int, help="E (required for trace directories)")
    p.add_argument("--model", default="GPT-32x1.3B", help="paper model shape for the cost model")
    p.add_argument("--ep", type=int, help="override the model's EP")
    p.add_argument("--micro-ep", type=int, help="override the model's MicroEP d")
    p.add_argument("--synthetic", default="zipf", help="zipf | lognormal | forced-bias | gaussian")
    p.add_argument("--skew", type=float, default=1.0, help="skew of the synthetic load model")
    p.add_argument("--micro-batches", type=int, default=24)
    p.add_argument("--variability", type=float, default=0.3, help="share of each micro-batch's popularity redrawn")
    p.add_argument("--history-fraction", type=float, default=0.25, help="EPLB-style history share")
    p.add_argument("--replacement-interval", type=int,
                   help="adaptive: micro-batches between re-placement checks (default: one iteration)")
    p.add_argument("--replacement-threshold", type=float, default=0.0,
                   help="adaptive: minimum predicted max/mean gain to re-place (0 = at every check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibrate", action="store_true", help="measure GEMM throughput on this machine")
    p.add_argument("--gemm-file", metavar="JSON",
                   help="grouped-GEMM throughput measured on a GPU by scripts/gpu_bench.sh OUT.json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_simulate)

    p = sub.add_parser("report", help="summarise a training run's --micro-ep-metrics-file, plot per-GPU load")
    p.add_argument("metrics", help="the JSON-lines file written with --micro-ep-metrics-file")
    p.add_argument("--plot", help="write a PNG of per-GPU load before/after (last report) here")
    p.add_argument("--layer", type=int, help="layer to plot (default: the first MoE layer recorded)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("prepare-data", help="text/JSONL files -> a Megatron indexed dataset (--data-path) "
                                            "and its tokenizer, offline")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text files (one document each), .jsonl files (one document per line), or directories")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin / PREFIX.idx (Megatron's --data-path)")
    p.add_argument("--tokenizer", help="your Hugging Face tokenizer.json or a directory with one "
                                       "(default: train a byte-level BPE on the corpus)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained tokenizer")
    p.add_argument("--tokenizer-out", help="where the tokenizer for training is saved (default PREFIX-tokenizer)")
    p.add_argument("--json-key", default="text", help="field of each JSONL line holding the document")
    p.add_argument("--glob", default="*", help="file pattern inside directories, e.g. '*.py' (default: all)")
    p.add_argument("--eod-token", help="end-of-document token of --tokenizer (default: its eos_token)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (no progress lines)")
    p.set_defaults(run=cmd_prepare_data)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "steps", 0) is None:
        args.steps = {"schedule": 200, "balance": 50, "paper": 24}[args.what]
    try:
        args.run(args)
    except InputError as exc:
        print(f"micromoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
