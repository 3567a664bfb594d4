"""One rank of an F-rank MicroEP group on ONE device: dispatcher, planning overlap, memory, GEMMs.

NCCL refuses two ranks on one GPU, so ``scripts/gpu_check.sh`` (>= 2 GPUs) cannot run on a
single-GPU box. This benchmark emulates rank 0 of a MicroEP group of ``F = d * EP`` ranks with
torch's fake process group (backend ``"fake"``): every collective returns at once, so what is timed
is this rank's own device and host work. The counts all-gathers are answered with counts from a
global routing draw (every rank's tokens pick their top-k experts under Zipf popularity), so the
plan, the splits and the sizes of every buffer are the ones rank 0 would see in a real group.

Per case (tokens T, hidden H, experts E, replicas d; EP and top-k fixed) it measures:

* ``dispatch_ms``: forward + backward of dispatch -> (experts replaced by a probs scale) -> combine,
  stock ``MoEAlltoAllTokenDispatcher`` over EP ranks vs ``MicroEPDispatcher`` over F ranks, with the
  plan cached (device-side work and host bookkeeping, no solve).
* ``exposed_plan_ms``: what planning adds to ``dispatch_preprocess`` (fresh counts every step, so
  the planner really solves) beyond the cached-plan time, as shipped (the host solves while the
  device permutes) and serialised (the device drained before the solve: no overlap).
* ``extra_bytes`` / ``extra_bytes_forward``: peak bytes allocated inside ``dispatch_preprocess`` /
  over the forward pass, MicroEP minus stock. On GPU from the caching allocator's peak; on CPU from
  a live-tensor accounting (``LiveBytes``).
* ``gemm``: grouped expert GEMM (fc1 + fc2, forward + backward) ms and TFLOPS against the tokens
  on this rank, for the ``E / EP`` local experts: TransformerEngine ``GroupedLinear`` where it
  imports, else one torch matmul per expert.

The JSON (``--json PATH``) is read by ``micromoe_megatron.sim.cost.calibrate_from_gpu_bench``.
Usage: ``scripts/gpu_bench.sh [--json PATH]``; ``--cpu-smoke`` (automatic without CUDA) runs tiny
sizes on the CPU so the script is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import statistics
import sys
import time
import weakref

import numpy as np
import torch
import torch.distributed as dist

PAPER = dict(tokens=[8192, 16384], hidden=[2048, 4096], experts=256, ep=8, replicas=[2, 4], top_k=8,
             gemm_tokens=[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536], repeats=10)
SMOKE = dict(tokens=[64], hidden=[16], experts=8, ep=2, replicas=[2], top_k=2, gemm_tokens=[16, 64], repeats=2)


# ------------------------------------------------------------------ counts

def global_routing_draw(num_gpus: int, tokens: int, experts: int, top_k: int, zipf_s: float,
                        seed: int, device: torch.device):
    """Every rank's top-k choices under one Zipf popularity (Gumbel top-k, distinct experts).

    Returns ``(routing_map [T, E] bool, probs [T, E] float32, counts [F, E] int64 numpy)``; the map
    and probs are rank 0's, ``counts[0] == routing_map.sum(0)``.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    popularity = 1.0 / torch.arange(1, experts + 1, dtype=torch.float32, device=device) ** zipf_s
    popularity = popularity[torch.randperm(experts, generator=generator, device=device)]
    log_p = torch.log(popularity / popularity.sum())
    counts = np.zeros((num_gpus, experts), dtype=np.int64)
    for rank in range(num_gpus):
        uniform = torch.rand((tokens, experts), generator=generator, device=device).clamp_(min=1e-20)
        scores = log_p - torch.log(-torch.log(uniform))
        top = scores.topk(top_k, dim=1)
        if rank == 0:
            routing_map = torch.zeros((tokens, experts), dtype=torch.bool, device=device)
            routing_map.scatter_(1, top.indices, True)
            probs = torch.zeros((tokens, experts), dtype=torch.float32, device=device)
            probs.scatter_(1, top.indices, torch.softmax(top.values, dim=1))
        counts[rank] = torch.bincount(top.indices.ravel(), minlength=experts).cpu().numpy()
    return routing_map, probs, counts


@contextlib.contextmanager
def answered_all_gathers(answers: dict):
    """Fill the output of every all-gather of ``numel`` in ``answers`` with ``answers[numel]()``.

    Under the fake process group an all-gather returns this rank's input repeated; the counts of
    the other ranks come from the global draw instead. Covers ``dist.all_gather_into_tensor`` (our
    dispatcher) and megatron's ``dist_all_gather_func`` (the stock dispatcher).
    """
    from megatron.core.tensor_parallel import mappings

    original = dist.all_gather_into_tensor
    original_megatron = mappings.dist_all_gather_func

    def answering(call):
        def gather(output, input, group=None, async_op=False):
            handle = call(output, input, group=group, async_op=async_op)
            if output.numel() in answers:
                output.copy_(torch.as_tensor(answers[output.numel()]()).view_as(output))
            return handle
        return gather

    dist.all_gather_into_tensor = answering(original)
    mappings.dist_all_gather_func = answering(original_megatron)
    try:
        yield
    finally:
        dist.all_gather_into_tensor = original
        mappings.dist_all_gather_func = original_megatron


@contextlib.contextmanager
def fake_group(num_gpus: int):
    """Rank 0 of a fake world of ``num_gpus`` ranks; yields ``(world, single)`` process groups."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=num_gpus)
    try:
        yield dist.group.WORLD, dist.new_group([0])
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ memory

class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensors created inside the block and still alive (CPU accounting).

    Every op output's storage is counted once while some Python tensor refers to it; tensors only
    autograd holds are not seen, so use it on forward code under ``torch.no_grad()``.
    """

    def __init__(self):
        super().__init__()
        self.live, self.peak, self._owners = 0, 0, {}

    def _release(self, pointer):
        count, nbytes = self._owners[pointer]
        if count == 1:
            del self._owners[pointer]
            self.live -= nbytes
        else:
            self._owners[pointer] = (count - 1, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)):
            storage = tensor.untyped_storage()
            pointer, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0:
                continue
            count, _ = self._owners.get(pointer, (0, nbytes))
            if count == 0:
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self._owners[pointer] = (count + 1, nbytes)
            weakref.finalize(tensor, self._release, pointer)
        return out


def peak_bytes(work, device: torch.device) -> int:
    """Peak bytes allocated while ``work()`` runs, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = work()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - before
    with torch.no_grad(), LiveBytes() as accounting:
        result = work()
    del result
    return accounting.peak


# ------------------------------------------------------------------ dispatchers

@dataclasses.dataclass
class Case:
    tokens: int
    hidden: int
    experts: int
    ep: int
    replicas: int
    top_k: int

    @property
    def num_gpus(self) -> int:
        return self.ep * self.replicas


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _config(case: Case, experts: int, group_size: int, dtype, fused: bool):
    from .layer_cases import moe_config

    config = moe_config(experts, case.top_k, group_size, hidden=case.hidden, ffn=case.hidden)
    config.moe_permute_fusion = fused
    config.params_dtype = dtype
    return config


def build_dispatchers(case: Case, world, single, dtype, fused: bool):
    """``(stock over EP ranks, MicroEP over F ranks, serial MicroEP)`` for rank 0 of the fake world."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from ..core.placement import make_placement
    from ..mcore.config import MicroEPConfig
    from ..mcore.dispatcher import MicroEPDispatcher

    local = case.experts // case.ep
    stock_group = dist.new_group(list(range(case.ep)))

    def groups(ep_group):
        collection = ProcessGroupCollection()
        collection.ep, collection.tp_ep, collection.expt_tp = ep_group, ep_group, single
        return collection

    stock = MoEAlltoAllTokenDispatcher(local, list(range(local)), _config(case, case.experts, case.ep, dtype, fused),
                                       pg_collection=groups(stock_group))
    placement = make_placement("symmetric", case.num_gpus, case.experts, case.replicas)
    physical = _config(case, case.experts * case.replicas, case.num_gpus, dtype, fused)
    micro = [cls(local, list(range(local)), physical, groups(world), placement=placement,
                 micro_ep=MicroEPConfig(replicas=case.replicas), vanilla_ep=case.ep)
             for cls in (MicroEPDispatcher, _serial(MicroEPDispatcher))]
    return stock, micro[0], micro[1]


def _serial(base):
    class SerialPlanning(base):
        """The dispatcher without overlap: the device is drained before the host plans."""

        def plan_for(self, tokens, *args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return super().plan_for(tokens, *args, **kwargs)

    return SerialPlanning


def _layer_pass(dispatcher, hidden, routing_map, probs, backward: bool):
    """dispatch -> probs-scaled identity "experts" -> combine (-> backward)."""
    x = hidden.detach().requires_grad_(backward)
    p = probs.detach().requires_grad_(backward)
    tokens, permuted_probs = dispatcher.dispatch_preprocess(x, routing_map, p)
    tokens, permuted_probs = dispatcher.token_dispatch(tokens, permuted_probs)
    tokens, _, permuted_probs = dispatcher.dispatch_postprocess(tokens, permuted_probs)
    out = tokens * permuted_probs.unsqueeze(-1).to(tokens.dtype)
    out = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(out)))
    if backward:
        out.backward(torch.ones_like(out))
    return out


def _median_ms(work, repeats: int, device: torch.device) -> float:
    work()  # warm-up (allocator, plan cache, kernels)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        work()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclasses.dataclass
class Emulation:
    """Rank 0 of the case's MicroEP group: its dispatchers, its data, and the counts it is told."""

    stock: object
    micro: object
    serial: object
    hidden: torch.Tensor
    routing_map: torch.Tensor
    probs: torch.Tensor
    next_counts: object    # () -> None: the next all-gather of [F, E] counts returns fresh counts


@contextlib.contextmanager
def emulate(case: Case, device: torch.device, dtype, zipf_s: float = 1.0, seed: int = 0, fresh_draws: int = 4):
    """Set up the fake group, the global routing draw and the answered all-gathers for ``case``."""
    fused = device.type == "cuda" and _have_te()
    routing_map, probs, counts = global_routing_draw(case.num_gpus, case.tokens, case.experts, case.top_k,
                                                     zipf_s, seed, device)
    hidden = torch.randn(case.tokens, case.hidden, device=device, dtype=dtype)
    # Fresh counts for the planning runs: rank 0's row stays (its map is fixed), the others are
    # redrawn (a smaller draw, scaled to T tokens per rank).
    small = min(case.tokens, 2048)
    fresh = []
    for i in range(fresh_draws):
        other = global_routing_draw(case.num_gpus, small, case.experts, case.top_k, zipf_s, seed + 1 + i,
                                    device)[2] * (case.tokens // small)
        other[0] = counts[0]
        fresh.append(other)
    cycle = itertools.cycle(fresh)
    current = {"micro": counts}
    answers = {case.ep * case.experts: lambda: counts[:case.ep].ravel(),
               case.num_gpus * case.experts: lambda: current["micro"].ravel()}
    with fake_group(case.num_gpus) as (world, single), answered_all_gathers(answers):
        stock, micro, serial = build_dispatchers(case, world, single, dtype, fused)
        yield Emulation(stock, micro, serial, hidden, routing_map, probs,
                        lambda: current.__setitem__("micro", next(cycle)))


def dispatch_extra_bytes(case: Case, device: torch.device, dtype) -> dict:
    """Peak bytes allocated, MicroEP minus stock (plan not cached): ``preprocess`` inside
    ``dispatch_preprocess`` (where the old ``to_physical`` built its ``[T, d * E]`` tables), and
    ``forward`` over the whole forward pass, dispatch to combine (the layer's peak)."""
    with emulate(case, device, dtype, fresh_draws=1) as em:
        def preprocess(dispatcher):
            return lambda: dispatcher.dispatch_preprocess(em.hidden, em.routing_map, em.probs)

        def forward(dispatcher):
            return lambda: _layer_pass(dispatcher, em.hidden, em.routing_map, em.probs, backward=False)

        return {scope: peak_bytes(work(em.micro), device) - peak_bytes(work(em.stock), device)
                for scope, work in (("preprocess", preprocess), ("forward", forward))}


def run_case(case: Case, device: torch.device, dtype, repeats: int, zipf_s: float, seed: int = 0) -> dict:
    """All dispatcher measurements of one case (see the module docstring)."""
    result = dataclasses.asdict(case)
    extra = dispatch_extra_bytes(case, device, dtype)
    result["extra_bytes"], result["extra_bytes_forward"] = extra["preprocess"], extra["forward"]
    with emulate(case, device, dtype, zipf_s, seed, fresh_draws=max(repeats, 2) + 1) as em:
        def preprocess(dispatcher, fresh: bool):
            def work():
                if fresh:
                    em.next_counts()
                    dispatcher._plans.clear()
                dispatcher.dispatch_preprocess(em.hidden, em.routing_map, em.probs)
            return work

        for name, dispatcher in (("stock", em.stock), ("micro_ep", em.micro)):
            result[f"dispatch_ms_{name}"] = _median_ms(
                lambda: _layer_pass(dispatcher, em.hidden, em.routing_map, em.probs, backward=True), repeats, device)
        result["preprocess_ms_cached_plan"] = _median_ms(preprocess(em.micro, fresh=False), repeats, device)
        for name, dispatcher in (("overlapped", em.micro), ("serial", em.serial)):
            dispatcher.stats.reset()
            ms = _median_ms(preprocess(dispatcher, fresh=True), repeats, device)
            result[f"exposed_plan_ms_{name}"] = max(ms - result["preprocess_ms_cached_plan"], 0.0)
            result[f"plan_ms_{name}"] = dispatcher.stats.schedule_ms_total / max(dispatcher.stats.steps, 1)
    return result


# ------------------------------------------------------------------ GEMM

def _have_te() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE built for another CUDA
        return False
    return True


def time_grouped_gemm(token_counts, local_experts: int, hidden: int, ffn: int, device, dtype,
                      repeats: int) -> dict:
    """fc1 (H -> FFN) and fc2 (FFN -> H) over ``local_experts`` equal groups, forward + backward.

    Returns ``{"backend", "hidden", "ffn_hidden", "local_experts", "rows": [{"tokens", "ms", "tflops"}]}``;
    TFLOPS count 3 x the forward's 2 * 2 * tokens * H * FFN (backward = 2 x forward).
    """
    if device.type == "cuda" and _have_te():
        from transformer_engine.pytorch import GroupedLinear

        backend = "transformer_engine.GroupedLinear"
        fc1 = GroupedLinear(local_experts, hidden, ffn, bias=False, params_dtype=dtype, device=device)
        fc2 = GroupedLinear(local_experts, ffn, hidden, bias=False, params_dtype=dtype, device=device)

        def mlp(x, splits):
            return fc2(torch.relu(fc1(x, splits)), splits)
    else:
        backend = "torch.matmul per expert"
        w1 = (torch.randn(local_experts, hidden, ffn, device=device, dtype=dtype) * 0.02).requires_grad_()
        w2 = (torch.randn(local_experts, ffn, hidden, device=device, dtype=dtype) * 0.02).requires_grad_()

        def mlp(x, splits):
            parts = torch.split(x, splits)
            return torch.cat([torch.relu(part @ w1[i]) @ w2[i] for i, part in enumerate(parts)])

    rows = []
    for tokens in token_counts:
        splits = [tokens // local_experts + (i < tokens % local_experts) for i in range(local_experts)]
        x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
        ms = _median_ms(lambda: mlp(x, splits).sum().backward(), repeats, device)
        rows.append({"tokens": tokens, "ms": ms, "tflops": 3 * 4.0 * tokens * hidden * ffn / (ms * 1e-3) / 1e12})
    return {"backend": backend, "hidden": hidden, "ffn_hidden": ffn, "local_experts": local_experts, "rows": rows}


# ------------------------------------------------------------------ main

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (automatic without CUDA)")
    parser.add_argument("--tokens", type=int, nargs="+", help="T per rank (default 8192 16384)")
    parser.add_argument("--hidden", type=int, nargs="+", help="H (default 2048 4096)")
    parser.add_argument("--experts", type=int, help="E (default 256)")
    parser.add_argument("--ep", type=int, help="vanilla EP; the MicroEP group is d x EP (default 8)")
    parser.add_argument("--replicas", type=int, nargs="+", help="d (default 2 4)")
    parser.add_argument("--top-k", type=int, help="default 8")
    parser.add_argument("--zipf", type=float, default=1.0, help="expert popularity skew s")
    parser.add_argument("--gemm-tokens", type=int, nargs="+", help="tokens per rank for the GEMM sweep")
    parser.add_argument("--ffn", type=int, help="expert FFN hidden size for the GEMM sweep (default: H of the "
                                                "first case)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    from ..mcore import cpu_compat

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    cpu_compat.apply()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = dict(PAPER if cuda else SMOKE)
    for key in sizes:
        if getattr(args, key, None) is not None:
            sizes[key] = getattr(args, key)
    name = torch.cuda.get_device_name() if cuda else "CPU (smoke sizes)"
    print(f"gpu_bench on {name}, {dtype}, torch {torch.__version__}, TE {'yes' if _have_te() else 'no'}; "
          f"one rank of a MicroEP group (fake process group), Zipf s={args.zipf}, top-{sizes['top_k']}, "
          f"E={sizes['experts']}, EP={sizes['ep']}", flush=True)
    results = {"device": name, "dtype": str(dtype), "torch": torch.__version__, "zipf_s": args.zipf, "cases": []}
    print(f"{'T':>6} {'H':>5} {'d':>2} {'F':>3} | dispatch fwd+bwd ms stock  MicroEP | plan ms | exposed plan ms "
          f"overlapped  serial | extra MiB preprocess  forward")
    for tokens, hidden, replicas in itertools.product(sizes["tokens"], sizes["hidden"], sizes["replicas"]):
        case = Case(tokens, hidden, sizes["experts"], sizes["ep"], replicas, sizes["top_k"])
        r = run_case(case, device, dtype, sizes["repeats"], args.zipf)
        results["cases"].append(r)
        print(f"{tokens:>6} {hidden:>5} {replicas:>2} {case.num_gpus:>3} | {r['dispatch_ms_stock']:>24.3f} "
              f"{r['dispatch_ms_micro_ep']:>8.3f} | {r['plan_ms_overlapped']:>7.3f} | "
              f"{r['exposed_plan_ms_overlapped']:>26.3f} {r['exposed_plan_ms_serial']:>7.3f} | "
              f"{r['extra_bytes'] / 2**20:>20.2f} {r['extra_bytes_forward'] / 2**20:>8.2f}", flush=True)
    local = sizes["experts"] // sizes["ep"]
    ffn = args.ffn or sizes["hidden"][0]
    results["gemm"] = time_grouped_gemm(sizes["gemm_tokens"], local, sizes["hidden"][0], ffn, device, dtype,
                                        sizes["repeats"])
    print(f"grouped expert GEMM ({results['gemm']['backend']}, {local} experts, H {sizes['hidden'][0]}, "
          f"FFN {ffn}, fwd+bwd):")
    for row in results["gemm"]["rows"]:
        print(f"  {row['tokens']:>6} tokens: {row['ms']:8.3f} ms  {row['tflops']:7.2f} TFLOPS")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
