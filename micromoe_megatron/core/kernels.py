"""Compiled inner loops of the planner and the router (numba, ``cache=True``; pure functions on arrays).

Each kernel is the array form of the loop it replaces in ``core.quota`` / ``core.routing`` and
takes the same decisions in the same order, so plans are the same bytes as the plain-Python
loops (``tests/test_kernels.py`` runs every kernel's ``py_func`` against the compiled code).

Graph layout (a placement's columns, one per (expert, holder), expert-major as in
``QuotaPlanner``): ``col_gpu [C]``, ``col_expert [C]``; CSR lists ``on_start [F+1]``/``on_cols [C]``
(columns on each GPU, ascending) and ``of_start [E+1]`` (the columns of expert ``e`` are
``of_start[e]:of_start[e+1]``, holder order). Counts are int64, exact below 2**62.

Compilation is lazy (first call) and cached on disk next to this file; numba is imported only
when a planner is built, so ``import micromoe_megatron.core`` stays light.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_FAR = np.int64(1) << np.int64(62)

# Kernel status codes (``drain``, ``build``; ``route``).
DONE, CUT, OVER_LIMIT = 0, 1, 2
UNCOVERED, LOST = 1, 2


@njit(cache=True, nogil=True)
def place_pool(quota, gpu_load, pool, capacity, of_start, col_gpu):  # pragma: no cover - compiled
    """Each expert in order puts its pool on its holders, most spare capacity first (lowest
    holder on ties); what no holder has room for goes to the least loaded one. In place."""
    for e in range(pool.size):
        left = pool[e]
        while left > 0:
            best = -1
            room = np.int64(0)
            for c in range(of_start[e], of_start[e + 1]):
                spare = capacity - gpu_load[col_gpu[c]]
                if best < 0 or spare > room:
                    best, room = c, spare
            amount = left if room <= 0 else min(left, room)
            quota[best] += amount
            gpu_load[col_gpu[best]] += amount
            left -= amount
        pool[e] = 0


@njit(cache=True, nogil=True)
def _path_amount(quota, held, gpu_load, capacity, source, target, par_g, par_c, par_step):  # pragma: no cover
    """Tokens the tree path source -> target can move now: the source's excess, the target's
    spare capacity, and each edge's room at its cost (earlier augmentations may have used it)."""
    amount = min(gpu_load[source] - capacity, capacity - gpu_load[target])
    node = target
    while par_g[node] >= 0:
        c = par_c[node]
        if quota[c] > held[c]:
            room = quota[c] - held[c]
        elif par_step[node]:
            room = quota[c]
        else:
            room = 0
        amount = min(amount, room)
        node = par_g[node]
    return amount


@njit(cache=True, nogil=True)
def drain(quota, held, gpu_load, capacity, work_limit, on_start, on_cols, of_start, col_gpu, col_expert,
          reached):  # pragma: no cover - compiled
    """Move load off GPUs above ``capacity`` along min-cost augmenting paths (0-1 BFS by cost layers). In place.

    Moving quota above a column's held tokens costs 0 (already remote), held tokens cost 1.
    GPUs with spare capacity are targets in pop order; one BFS tree serves several augmentations,
    and the search stops as soon as the source's excess is gone.
    ``work_limit < 0``: unlimited. Returns ``(status, paths)``: ``DONE``; ``CUT`` with ``reached
    [F]`` set to the GPUs the BFS reached (closed, Eq. 3 density > capacity); or ``OVER_LIMIT``.
    """
    f = gpu_load.size
    pairs = 0
    for e in range(of_start.size - 1):
        w = of_start[e + 1] - of_start[e]
        pairs += w * w
    size = 2 * (pairs + f) + 2
    now = np.empty(size, dtype=np.int64)
    later = np.empty(size, dtype=np.int64)
    cost = np.empty(f, dtype=np.int64)
    par_g = np.empty(f, dtype=np.int64)
    par_c = np.empty(f, dtype=np.int64)
    par_c2 = np.empty(f, dtype=np.int64)
    par_step = np.empty(f, dtype=np.int64)
    seen = np.empty(f, dtype=np.bool_)
    done = np.empty(f, dtype=np.bool_)
    snapshot = np.empty(quota.size, dtype=np.int64)
    paths = 0
    source = 0
    while True:
        while source < f and gpu_load[source] <= capacity:
            source += 1
        if source == f:
            break
        if work_limit >= 0 and paths >= work_limit:
            return OVER_LIMIT, paths
        # The tree is grown on the quota as it was when this search started (``snapshot``), and
        # each target is used as soon as it is popped, in pop order, with the live quota: the same
        # augmentations as growing the whole tree first, but the search stops once the source's
        # excess is gone instead of exploring the rest of the graph.
        snapshot[:] = quota
        cost[:] = _FAR
        seen[:] = False
        done[:] = False
        cost[source] = 0
        seen[source] = True
        par_g[source] = -1
        # Cost layers in turn, each in FIFO order: min-cost paths, and among those few hops
        # (short paths carry more per augmentation and reach a target sooner).
        now[0] = source
        head, num_now, num_later = 0, 1, 0
        num_targets = 0
        while gpu_load[source] > capacity:
            if head == num_now:
                if num_later == 0:
                    break
                now, later = later, now
                head, num_now, num_later = 0, num_later, 0
            g = now[head]
            head += 1
            if done[g]:
                continue
            done[g] = True
            if g != source and gpu_load[g] < capacity:
                num_targets += 1
                amount = _path_amount(quota, held, gpu_load, capacity, source, g, par_g, par_c, par_step)
                if amount > 0:
                    node = g
                    while par_g[node] >= 0:
                        quota[par_c[node]] -= amount
                        quota[par_c2[node]] += amount
                        node = par_g[node]
                    gpu_load[source] -= amount
                    gpu_load[g] += amount
                    paths += 1
                continue
            base = cost[g]
            for i in range(on_start[g], on_start[g + 1]):
                c = on_cols[i]
                if snapshot[c] == 0:
                    continue
                step = 0 if snapshot[c] > held[c] else 1
                e = col_expert[c]
                for c2 in range(of_start[e], of_start[e + 1]):
                    h = col_gpu[c2]
                    if done[h] or cost[h] <= base + step:
                        continue
                    cost[h] = base + step
                    seen[h] = True
                    par_g[h], par_c[h], par_c2[h], par_step[h] = g, c, c2, step
                    if step:
                        later[num_later] = h
                        num_later += 1
                    else:
                        now[num_now] = h
                        num_now += 1
        if num_targets == 0:
            reached[:] = seen
            return CUT, paths
    return DONE, paths


@njit(cache=True, nogil=True)
def reclaim(quota, held, gpu_load, capacity, on_start, on_cols, of_start, col_gpu,
            col_expert):  # pragma: no cover - compiled
    """Win back held tokens moved away, along cycles that cost no other local token. In place.

    For a column c (expert e on GPU g) below its held tokens, take quota of e from a holder h
    where it exceeds h's held tokens, and make room on g by moving remote quota along a BFS path
    to a GPU with spare capacity or to h. Returns the cycles used.
    """
    f = gpu_load.size
    parent_x = np.empty(f, dtype=np.int64)
    parent_c1 = np.empty(f, dtype=np.int64)
    parent_c2 = np.empty(f, dtype=np.int64)
    seen = np.empty(f, dtype=np.bool_)
    frontier = np.empty(f, dtype=np.int64)
    nxt = np.empty(f, dtype=np.int64)
    path_c1 = np.empty(f, dtype=np.int64)
    path_c2 = np.empty(f, dtype=np.int64)
    deficit = quota < held  # fixed at the start (cycles never create a deficit)
    cycles = 0
    for c in range(quota.size):
        if not deficit[c]:
            continue
        g = col_gpu[c]
        e = col_expert[c]
        for donor in range(of_start[e], of_start[e + 1]):
            if quota[c] >= held[c]:
                break
            if donor == c or quota[donor] <= held[donor]:
                continue
            h = col_gpu[donor]
            want = min(held[c] - quota[c], quota[donor] - held[donor])
            length = 0
            if gpu_load[g] >= capacity:
                seen[:] = False
                seen[g] = True
                parent_x[g] = -1
                frontier[0] = g
                size = 1
                target = -1
                while size > 0 and target < 0:
                    next_size = 0
                    for k in range(size):
                        x = frontier[k]
                        for i in range(on_start[x], on_start[x + 1]):
                            c1 = on_cols[i]
                            if quota[c1] <= held[c1] or c1 == c:
                                continue
                            e1 = col_expert[c1]
                            for c2 in range(of_start[e1], of_start[e1 + 1]):
                                y = col_gpu[c2]
                                if seen[y]:
                                    continue
                                seen[y] = True
                                parent_x[y], parent_c1[y], parent_c2[y] = x, c1, c2
                                if y == h or gpu_load[y] < capacity:
                                    target = y
                                    break
                                nxt[next_size] = y
                                next_size += 1
                            if target >= 0:
                                break
                        if target >= 0:
                            break
                    frontier[:next_size] = nxt[:next_size]
                    size = next_size
                if target < 0:
                    continue
                node = target
                while parent_x[node] >= 0:
                    c1 = parent_c1[node]
                    path_c1[length] = c1
                    path_c2[length] = parent_c2[node]
                    length += 1
                    want = min(want, quota[c1] - held[c1])
                    node = parent_x[node]
                if target != h:
                    want = min(want, capacity - gpu_load[target])
                gpu_load[target] += want
                gpu_load[g] -= want
            else:
                want = min(want, capacity - gpu_load[g])
            for k in range(length):
                quota[path_c1[k]] -= want
                quota[path_c2[k]] += want
            quota[donor] -= want
            quota[c] += want
            gpu_load[h] -= want
            gpu_load[g] += want
            cycles += 1
    return cycles


@njit(cache=True, nogil=True)
def _fill(row, demand, first, last, holders, count, routed, base):  # pragma: no cover - compiled
    """Pair one expert's ``row[first:last]`` (supply per source, in order) with ``demand
    [holders[:count]]`` (holders in order) as ranges: the first supply units to the first demand
    units, until either runs out (paper Algorithm 1's inner loop). Adds the pairs to
    ``routed[base + holder index, source]``; in place."""
    s = first
    k = 0
    while s < last and k < count:
        j = holders[k]
        if row[s] == 0:
            s += 1
            continue
        if demand[j] == 0:
            k += 1
            continue
        amount = min(row[s], demand[j])
        routed[base + j, s] += amount
        row[s] -= amount
        demand[j] -= amount


@njit(cache=True, nogil=True)
def _node_holders(holder_table, e, j0, node, holders):  # pragma: no cover - compiled
    """The holders of expert ``e`` in the node of its ``j0``-th holder, in holder order, into
    ``holders``: ``(first GPU of the node, count)``; count 0 when ``j0`` is padding or an earlier
    holder already stands for that node (each node's tier-2 fill runs once)."""
    g0 = holder_table[e, j0]
    if g0 < 0:
        return 0, 0
    first = g0 // node * node
    for j in range(j0):
        if first <= holder_table[e, j] < first + node:
            return first, 0
    count = 0
    for j in range(j0, holder_table.shape[1]):
        if first <= holder_table[e, j] < first + node:
            holders[count] = j
            count += 1
    return first, count


@njit(cache=True, nogil=True)
def _route_expert(tokens, e, quota, holder_table, node, row, demand, holders, routed, base):  # pragma: no cover
    """Paper Algorithm 1 for expert ``e``: pair its tokens (``tokens[:, e]``, copied into the
    scratch ``row [F]`` and consumed) with its quota, local first, then same node (``node`` GPUs
    per node), then anywhere. Adds the pairs to ``routed[base + j, source]`` (``j``: holder
    index in ``holder_table[e]``). Returns the tokens plus quota left unpaired (0 when the quota
    row sums to the load and sits on the holders)."""
    num_gpus = row.size
    num_holders = holder_table.shape[1]
    for s in range(num_gpus):
        row[s] = tokens[s, e]
    for j in range(num_holders):
        g = holder_table[e, j]
        demand[j] = quota[e, g] if g >= 0 else 0
        if g >= 0:                                                    # tier 1: already there
            local = min(row[g], demand[j])
            routed[base + j, g] += local
            row[g] -= local
            demand[j] -= local
    if node < num_gpus:                                               # tier 2: same node
        for j0 in range(num_holders):                                 # each holder's node once
            first, count = _node_holders(holder_table, e, j0, node, holders)
            if count == 0:
                continue
            _fill(row, demand, first, first + node, holders, count, routed, base)
    count = 0                                                         # tier 3: anywhere
    for j in range(num_holders):
        if holder_table[e, j] >= 0:
            holders[count] = j
            count += 1
    _fill(row, demand, 0, num_gpus, holders, count, routed, base)
    left = np.int64(0)
    for s in range(num_gpus):
        left += row[s]
    for j in range(num_holders):
        left += demand[j]
    return left


@njit(cache=True, nogil=True)
def _route_status(tokens, e, quota):  # pragma: no cover - compiled
    """Why expert ``e`` could not be routed: ``UNCOVERED`` (its quota row does not sum to its
    load) or ``LOST`` (quota off its holders)."""
    total = np.int64(0)
    for s in range(tokens.shape[0]):
        total += tokens[s, e]
    for g in range(quota.shape[1]):
        total -= quota[e, g]
    return UNCOVERED if total else LOST


@njit(cache=True, nogil=True)
def route(tokens, quota, holder_table, gpus_per_node):  # pragma: no cover - compiled
    """Routes ``[R, 4]`` (src, expert, dst, count) sorted by (src, expert, holder order), and a
    status: 0, ``UNCOVERED`` (quota rows do not sum to the loads) or ``LOST`` (quota off the
    holders left tokens unrouted); see ``core.routing.route_tokens``. ``tokens [F, E]`` (read
    only); ``gpus_per_node <= 0``: one node."""
    num_gpus, num_experts = tokens.shape
    num_holders = holder_table.shape[1]
    node = gpus_per_node if 0 < gpus_per_node < num_gpus else num_gpus
    demand = np.zeros(num_holders, dtype=np.int64)
    holders = np.empty(num_holders, dtype=np.int64)
    row = np.empty(num_gpus, dtype=np.int64)
    # [(expert, holder), source]: each expert's fills write along its own D contiguous rows.
    routed = np.zeros((num_experts * num_holders, num_gpus), dtype=np.int64)
    for e in range(num_experts):
        if _route_expert(tokens, e, quota, holder_table, node, row, demand, holders, routed, e * num_holders):
            return np.zeros((0, 4), dtype=np.int64), _route_status(tokens, e, quota)
    # Counting sort by source; scanning (expert, holder) rows in order keeps each source's rows
    # sorted by (expert, holder).
    offset = np.zeros(num_gpus + 1, dtype=np.int64)
    for k in range(num_experts * num_holders):
        for s in range(num_gpus):
            if routed[k, s] != 0:
                offset[s + 1] += 1
    for s in range(num_gpus):
        offset[s + 1] += offset[s]
    routes = np.empty((offset[num_gpus], 4), dtype=np.int64)
    for k in range(num_experts * num_holders):
        e = k // num_holders
        g = holder_table[e, k - e * num_holders]
        for s in range(num_gpus):
            amount = routed[k, s]
            if amount != 0:
                r = offset[s]
                routes[r, 0] = s
                routes[r, 1] = e
                routes[r, 2] = g
                routes[r, 3] = amount
                offset[s] = r + 1
    return routes, 0


@njit(cache=True, nogil=True)
def _sent_by(tokens, e, quota, holder_table, node, rank, before, demand, holders, local, amount):  # pragma: no cover
    """What ``rank`` sends of expert ``e`` to each holder (``amount [D]``, in place) when ``rank``
    holds no replica of ``e``: ``_route_expert``'s pairs from ``rank``, computed from the holders'
    nodes alone (O(D x node) instead of O(F)). ``before`` = tokens of ``e`` on sources below
    ``rank``. Tiers 1 and 2 involve only sources in holder nodes and end before tier 3; tier 3
    pairs ranges in source order, so ``rank``'s range starts at ``before`` minus what the sources
    below it paired in tiers 1 and 2, against the holders' demand left after them."""
    num_gpus = tokens.shape[0]
    num_holders = holder_table.shape[1]
    paired_before = np.int64(0)
    for j in range(num_holders):                                      # tier 1
        amount[j] = 0
        g = holder_table[e, j]
        demand[j] = quota[e, g] if g >= 0 else 0
        local[j] = 0
        if g >= 0:
            local[j] = min(tokens[g, e], demand[j])
            demand[j] -= local[j]
            if g < rank:
                paired_before += local[j]
    left = tokens[rank, e]
    if node < num_gpus:                                               # tier 2: holder nodes only
        for j0 in range(num_holders):
            first, count = _node_holders(holder_table, e, j0, node, holders)
            if count == 0:
                continue
            k = 0
            for s in range(first, first + node):  # every source: tier 2 ends before tier 3 starts
                supply = tokens[s, e]
                for j in range(num_holders):
                    if holder_table[e, j] == s:
                        supply -= local[j]
                while supply > 0 and k < count:
                    j = holders[k]
                    if demand[j] == 0:
                        k += 1
                        continue
                    paired = min(supply, demand[j])
                    supply -= paired
                    demand[j] -= paired
                    if s < rank:
                        paired_before += paired
                    elif s == rank:
                        amount[j] += paired
                        left -= paired
                if k == count:
                    break
    start = before - paired_before                                    # tier 3: rank's range
    position = np.int64(0)
    for j in range(num_holders):
        if holder_table[e, j] < 0:
            continue
        low = max(start, position)
        high = min(start + left, position + demand[j])
        if high > low:
            amount[j] += high - low
        position += demand[j]


@njit(cache=True, nogil=True)
def rank_route(tokens, quota, holder_table, gpus_per_node, rank):  # pragma: no cover - compiled
    """The rows of ``route``'s output with ``src == rank`` and with ``dst == rank``, in the same
    order, without building the others: ``(sent [S, 4], received [R, 4], status)`` (status as in
    ``route``, checked for every expert). Experts held on ``rank`` are routed whole
    (``_route_expert``), the others only for ``rank``'s own tokens (``_sent_by``)."""
    num_gpus, num_experts = tokens.shape
    num_holders = holder_table.shape[1]
    node = gpus_per_node if 0 < gpus_per_node < num_gpus else num_gpus
    load = np.zeros(num_experts, dtype=np.int64)
    before = np.zeros(num_experts, dtype=np.int64)                   # tokens on sources < rank
    for s in range(num_gpus):
        if s == rank:
            before[:] = load
        for e in range(num_experts):
            load[e] += tokens[s, e]
    for e in range(num_experts):
        covered = np.int64(0)
        for j in range(num_holders):
            if holder_table[e, j] >= 0:
                covered += quota[e, holder_table[e, j]]
        if covered != load[e]:
            empty = np.zeros((0, 4), dtype=np.int64)
            return empty, empty, _route_status(tokens, e, quota)
    demand = np.zeros(num_holders, dtype=np.int64)
    holders = np.empty(num_holders, dtype=np.int64)
    local = np.empty(num_holders, dtype=np.int64)
    amount = np.empty(num_holders, dtype=np.int64)
    row = np.empty(num_gpus, dtype=np.int64)
    routed = np.empty((num_holders, num_gpus), dtype=np.int64)          # one expert's pairs
    sent = np.empty((num_experts * num_holders, 4), dtype=np.int64)
    received = np.empty((num_experts * num_gpus, 4), dtype=np.int64)    # expert-major, sorted below
    num_sent = num_received = 0
    for e in range(num_experts):
        mine = -1
        for j in range(num_holders):
            if holder_table[e, j] == rank:
                mine = j
        if mine >= 0:
            routed[:, :] = 0
            _route_expert(tokens, e, quota, holder_table, node, row, demand, holders, routed, 0)
            for j in range(num_holders):
                amount[j] = routed[j, rank]
            for s in range(num_gpus):
                if routed[mine, s] != 0:
                    received[num_received, 0] = s
                    received[num_received, 1] = e
                    received[num_received, 2] = rank
                    received[num_received, 3] = routed[mine, s]
                    num_received += 1
        elif tokens[rank, e] != 0:
            _sent_by(tokens, e, quota, holder_table, node, rank, before[e], demand, holders, local, amount)
        else:
            continue
        for j in range(num_holders):
            if amount[j] != 0:
                sent[num_sent, 0] = rank
                sent[num_sent, 1] = e
                sent[num_sent, 2] = holder_table[e, j]
                sent[num_sent, 3] = amount[j]
                num_sent += 1
    # Stable counting sort of the received rows by source: (src, expert) order, as in ``route``.
    offset = np.zeros(num_gpus + 1, dtype=np.int64)
    for r in range(num_received):
        offset[received[r, 0] + 1] += 1
    for s in range(num_gpus):
        offset[s + 1] += offset[s]
    ordered = np.empty((num_received, 4), dtype=np.int64)
    for r in range(num_received):
        k = offset[received[r, 0]]
        ordered[k, :] = received[r, :]
        offset[received[r, 0]] = k + 1
    return sent[:num_sent].copy(), ordered, 0


@njit(cache=True, nogil=True)
def local_tokens(tokens, quota):  # pragma: no cover - compiled
    """Tokens a plan keeps on their own GPU: ``sum min(tokens[g, e], quota[e, g])`` (routing's tier 1
    pairs exactly these; ``quota`` is 0 off the holders)."""
    num_gpus, num_experts = tokens.shape
    total = np.int64(0)
    for g in range(num_gpus):
        for e in range(num_experts):
            total += min(tokens[g, e], quota[e, g])
    return total


@njit(cache=True, nogil=True)
def prepare(tokens, col_gpu, col_expert, set_id, set_size):  # pragma: no cover - compiled
    """One pass over ``tokens [F, E]``: expert loads ``[E]``, held tokens per column ``[C]``, the
    load held on each GPU ``[F]``, each expert's tokens not on a holder ``[E]``, the total, and the
    densest holder set (``argmax set_load / set_size``, first on ties) with its load."""
    num_gpus, num_experts = tokens.shape
    load = np.zeros(num_experts, dtype=np.int64)
    for s in range(num_gpus):
        for e in range(num_experts):
            load[e] += tokens[s, e]
    total = np.int64(0)
    for e in range(num_experts):
        total += load[e]
    held = np.empty(col_gpu.size, dtype=np.int64)
    held_gpu_load = np.zeros(num_gpus, dtype=np.int64)
    pool = load.copy()
    for c in range(col_gpu.size):
        amount = tokens[col_gpu[c], col_expert[c]]
        held[c] = amount
        held_gpu_load[col_gpu[c]] += amount
        pool[col_expert[c]] -= amount
    set_load = np.zeros(set_size.size, dtype=np.int64)
    for e in range(num_experts):
        set_load[set_id[e]] += load[e]
    densest = 0
    for k in range(1, set_size.size):
        if set_load[k] / set_size[k] > set_load[densest] / set_size[densest]:
            densest = k
    densest_load = set_load[densest] if set_size.size else np.int64(0)
    return load, held, held_gpu_load, pool, total, densest, densest_load


@njit(cache=True, nogil=True)
def build(held, held_gpu_load, pool_start, load, capacity, work_limit, on_start, on_cols, of_start, col_gpu,
          col_expert, holder_table):  # pragma: no cover - compiled
    """One build of the quota at ``capacity`` from scratch (``QuotaPlanner.solve``'s loop body):
    keep held tokens, place the pool, drain, reclaim.

    Returns ``(status, work, quota [E, F], induced, size)``: ``DONE`` with the quota matrix;
    ``CUT`` with the Eq. 3 numerator and denominator of the GPU set the drain reached (the
    experts all of whose holders lie in it, and its size); ``OVER_LIMIT`` (``work_limit >= 0``).
    """
    num_gpus = held_gpu_load.size
    num_experts = pool_start.size
    quota = held.copy()
    gpu_load = held_gpu_load.copy()
    pool = pool_start.copy()
    place_pool(quota, gpu_load, pool, capacity, of_start, col_gpu)
    work = 0
    over = False
    for g in range(num_gpus):
        if gpu_load[g] > capacity:
            over = True
    if over:
        reached = np.zeros(num_gpus, dtype=np.bool_)
        status, work = drain(quota, held, gpu_load, capacity, work_limit, on_start, on_cols, of_start, col_gpu,
                             col_expert, reached)
        if status == OVER_LIMIT:
            return status, work, np.zeros((0, 0), dtype=np.int64), 0, 0
        if status == CUT:
            induced = np.int64(0)
            for e in range(num_experts):
                inside = True
                for j in range(holder_table.shape[1]):
                    g = holder_table[e, j]
                    if g >= 0 and not reached[g]:
                        inside = False
                if inside:
                    induced += load[e]
            size = 0
            for g in range(num_gpus):
                size += reached[g]
            return status, work, np.zeros((0, 0), dtype=np.int64), induced, size
        work += reclaim(quota, held, gpu_load, capacity, on_start, on_cols, of_start, col_gpu, col_expert)
    matrix = np.zeros((num_experts, num_gpus), dtype=np.int64)
    for c in range(quota.size):
        matrix[col_expert[c], col_gpu[c]] = quota[c]
    return DONE, work, matrix, 0, 0


@njit(cache=True, nogil=True)
def counts_ok(tokens):  # pragma: no cover - compiled
    """True when every count is in [0, 2**40) and the total is below 2**62 (the common case, one
    branch-free integer pass); False sends the caller to the exact, slow validation."""
    if tokens.size >= 1 << 22:  # the int64 sum below could wrap
        return False
    total = np.int64(0)
    bad = np.int64(0)
    for s in range(tokens.shape[0]):
        for e in range(tokens.shape[1]):
            value = tokens[s, e]
            bad |= value >> 40  # nonzero for a negative count or one >= 2**40
            total += value
    return bad == 0 and total < np.int64(1) << np.int64(62)


@njit(cache=True, nogil=True)
def quota_error(quota, load, capacity):  # pragma: no cover - compiled
    """0 when ``quota [E, F]`` is >= 0, its rows sum to the expert loads ``load [E]`` and no GPU
    exceeds ``capacity``; 1 negative or wrong sums; 2 over capacity. Row-major passes only."""
    num_experts, num_gpus = quota.shape
    column = np.zeros(num_gpus, dtype=np.int64)
    for e in range(num_experts):
        row = np.int64(0)
        for g in range(num_gpus):
            amount = quota[e, g]
            if amount < 0:
                return 1
            row += amount
            column[g] += amount
        if row != load[e]:
            return 1
    for g in range(num_gpus):
        if column[g] > capacity:
            return 2
    return 0
