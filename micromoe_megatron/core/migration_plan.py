"""The slot moves of a live migration between two placements, packed into rounds (paper Sec. 6.4).

Pure numpy + HiGHS, no torch: every rank computes the same plan from the same two placements, and
``mcore/migration.py`` executes it. Every rank's slot ``j`` must end up holding logical expert
``new.phy2log[rank, j]``'s weights and optimizer state exactly as they were.

Moves. A slot whose expert stays put is not touched. A changed slot ``(g, j)`` copies its new
expert from an old holder: ``g`` itself when it held the expert (a local copy, no traffic), else
the holder with the fewest sends so far (sends are what limit the rounds), one whose slot does not
change first among equals. Relays: a hot expert gaining many replicas would queue all its copies on
its few old holders, so a second plan may also copy from slots that received the expert in an
earlier round (a greedy broadcast); ``plan_migration`` keeps it when it has fewer rounds.

Rounds. In one round every rank sends (reads) at most one slot and receives (writes) at most one;
a local copy is both the rank's send and its receive. Within a round every read happens before any
write, so a slot may be read and overwritten in the same round. Packing the moves into rounds is
edge colouring of the bipartite multigraph senders x receivers (one edge per move): by König's
theorem ``Δ`` rounds suffice, ``Δ`` the most moves any rank sends or receives, and no plan has
fewer. Each round is one perfect matching of that graph made ``Δ_t``-regular with dummy edges
(a min-weight assignment LP in HiGHS, whose vertex solutions are integral; a regular bipartite
multigraph always has a perfect matching), so every rank of largest remaining degree moves one slot per round.

Order. A changed slot that some move still has to read must not be overwritten before that read.
The matching's weights favour reads of such slots and disfavour writes into them; a write that
still goes first saves the slot's old payload aside on its rank in the same round (a "stash", read
before the write), and the later reads take it from there. A rank holds at most one stash: a write
that would need a second one waits for a later round (the plan may then exceed ``Δ`` rounds).
Cycles of moves (swaps) are the same case: one stash breaks each. Relays add the order "a slot's
write before any read of its new content"; a relay waits for it, and the matching favours the
starts of the longest relay chains. No plan has fewer rounds than the most changed slots on one
rank (``receive_bound``); ``scripts/bench_migration_rounds.py`` prints both bounds.

Peak extra memory per rank: one payload sent plus one received per round and at most one stashed
(each one slot's weights and optimizer state).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import highspy
import numpy as np

from .highs import new_highs
from .placement import Placement

STASH = -1  # a move's src_slot when it reads a stashed payload, its dst_slot when it stashes one


@dataclass(frozen=True)
class SlotMove:
    """Copy logical ``expert``'s payload from (src_rank, src_slot) to (dst_rank, dst_slot).

    ``src_slot == STASH``: read the payload stashed on src_rank for slot ``stash_of`` instead of a slot.
    ``dst_slot == STASH``: keep the payload of (src_rank, src_slot) on that rank (a local stash,
    ``stash_of == src_slot``), read before the round's writes.
    """

    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int
    stash_of: int = -1  # the slot whose payload was stashed (for STASH moves)

    @property
    def local(self) -> bool:
        return self.src_rank == self.dst_rank


@dataclass(frozen=True)
class MigrationPlan:
    """Rounds of moves (see the module docstring); ``changed`` is bool ``[F, L]``.

    ``bound`` is the degree lower bound ``Δ`` (most slot moves sent or received by one rank, a
    local copy counting as both); ``len(rounds) == bound`` unless a rank would have needed a
    second stash.
    """

    rounds: tuple[tuple[SlotMove, ...], ...]
    changed: np.ndarray
    bound: int = 0

    @property
    def moves(self) -> list[SlotMove]:
        return [m for r in self.rounds for m in r if m.dst_slot != STASH]

    @property
    def remote_moves(self) -> int:
        """Slot payloads sent between ranks of the MicroEP group."""
        return sum(not m.local for m in self.moves)

    @property
    def receive_bound(self) -> int:
        """The most changed slots on one rank: no plan, relays or not, has fewer rounds."""
        return int(self.changed.sum(axis=1).max()) if self.changed.size else 0

    @property
    def stashes(self) -> int:
        return sum(m.dst_slot == STASH for r in self.rounds for m in r)


def _choose_moves(old: Placement, new: Placement, changed: np.ndarray,
                  relay: bool) -> tuple[list[SlotMove], list[int]]:
    """One move per changed slot and, per move, the move whose written slot it relays from (-1:
    it reads the old placement). Deterministic.

    A GPU that held the expert copies locally. Otherwise, without ``relay``, the old holder with the
    fewest sends so far. With ``relay``, the copy of the expert that could send soonest: an old
    holder (ready at round 0) or a slot already given the expert by an earlier move (ready one round
    after its write), plus twice the sends its rank already has (sends also cost the rank's other
    experts). This is a greedy broadcast (copies multiply the senders), so a hot expert gaining
    many replicas does not queue all its copies on its few old holders.
    """
    num_gpus = old.num_gpus
    sends = np.zeros(num_gpus, dtype=np.int64)
    targets = [(int(g), int(j), int(new.phy2log[g, j])) for g, j in zip(*np.nonzero(changed))]
    # Local copies first (they fix their source), then expert by expert.
    targets.sort(key=lambda t: (t[0] not in old.holders[t[2]], t[2], t[0], t[1]))
    copies: dict[int, list[tuple[int, int, int, int]]] = {}  # expert -> [(ready round, rank, slot, move)]
    moves, parent = [], []
    for g, j, expert in targets:
        slot = int(old.expert_slot[expert])
        if expert not in copies:
            copies[expert] = [(0, h, slot, -1) for h in old.holders[expert]]
        if g in old.holders[expert]:
            ready, source = 1, (0, g, slot, -1)
        else:
            # Earliest round this copy can send (ready + queued sends), then old content first.
            source = min(copies[expert] if relay else copies[expert][:len(old.holders[expert])],
                         key=lambda c: (c[0] + 2 * sends[c[1]], c[3] >= 0, bool(changed[c[1], c[2]]), c[1], c[2]))
            ready = source[0] + sends[source[1]] + 1
        sends[source[1]] += 1
        copies[expert].append((ready, g, j, len(moves)))
        moves.append(SlotMove(expert, source[1], source[2], g, j))
        parent.append(source[3])
    return moves, parent


def degree_bound(moves, num_gpus: int) -> int:
    """``Δ``: the most moves one rank sends or receives (no packing has fewer rounds, König)."""
    if not moves:
        return 0
    sends = np.bincount([m.src_rank for m in moves], minlength=num_gpus)
    receives = np.bincount([m.dst_rank for m in moves], minlength=num_gpus)
    return int(max(sends.max(), receives.max()))


# Matching weights (lower is preferred): a move that reads a slot still to be overwritten unblocks
# that write; a write into a slot still to be read needs a stash; dummy edges sit in between.
_W_RELAY_SOURCE, _W_UNBLOCKS, _W_PLAIN, _W_DUMMY, _W_NEEDS_STASH, _W_WAITS, _W_EXCLUDED = \
    0.9, 1.0, 2.0, 3.0, 6.0, 50.0, 1000.0
_REMATCHES = 8


def plan_migration(old: Placement, new: Placement, relay: bool = True) -> MigrationPlan:
    """The slot moves that turn ``old`` into ``new``, in rounds; pure and deterministic.

    Args:
        old, new: placements over the same ``F`` GPUs x ``L`` slots and ``E`` experts.
        relay: also try relaying copies from slots written earlier in the migration, and keep
            whichever plan has fewer rounds (False: every copy reads the old placement, and the
            rounds are the edge colouring of those moves).
    Returns:
        A ``MigrationPlan``; executing its rounds in order (reads before writes within a round)
        leaves every slot ``(g, j)`` holding ``new.phy2log[g, j]``.
    Raises:
        ValueError: the placements do not have the same shape or expert count.
    """
    if old.phy2log.shape != new.phy2log.shape or old.num_experts != new.num_experts:
        raise ValueError(f"cannot migrate between placements of {old.phy2log.shape} / {old.num_experts} experts "
                         f"and {new.phy2log.shape} / {new.num_experts} experts")
    changed = old.phy2log != new.phy2log
    # Relays help when a hot expert gains many replicas and cost precedence otherwise: plan both
    # ways, keep the fewer rounds (ties: no relays).
    best = _pack(old, changed, *_choose_moves(old, new, changed, False))
    if relay and len(best.rounds) > best.receive_bound:  # at the receive bound nothing is shorter
        relayed = _pack(old, changed, *_choose_moves(old, new, changed, True))
        best = relayed if len(relayed.rounds) < len(best.rounds) else best
    changed.setflags(write=False)
    return best


def _pack(old: Placement, changed: np.ndarray, pending: list[SlotMove], parent: list[int]) -> MigrationPlan:
    """Rounds for the moves ``pending`` (see the module docstring)."""
    num_gpus = old.num_gpus
    bound = degree_bound(pending, num_gpus)
    readers: dict[tuple[int, int], set[int]] = defaultdict(set)  # changed slot -> pending reads of its old content
    children: dict[int, set[int]] = defaultdict(set)  # move -> pending moves relaying from its slot
    for i, m in enumerate(pending):
        if parent[i] >= 0:
            children[parent[i]].add(i)
        elif changed[m.src_rank, m.src_slot]:
            readers[m.src_rank, m.src_slot].add(i)
    waiting_for = {i: p for i, p in enumerate(parent) if p >= 0}  # relays whose source is not written yet
    height = np.zeros(len(pending), dtype=np.int64)  # longest chain of relays below each move
    for i in range(len(pending) - 1, -1, -1):  # a relay's parent comes before it in `pending`
        if parent[i] >= 0:
            height[parent[i]] = max(height[parent[i]], height[i] + 1)
    highs = new_highs(highspy.HighsLp())  # one solver for every round's matching (its model is replaced)
    stashed: dict[int, dict[int, set[int]]] = defaultdict(dict)  # rank -> {slot: pending moves reading its stash}
    live = dict(enumerate(pending))
    rounds = []
    while live:
        # A rank holds at most one stash: a matched write that would need a second one is left out
        # and the round matched again without it (a few times); if that stalls every write, the
        # round goes ahead with a second stash rather than never finishing.
        excluded: set[int] = set()
        for _ in range(_REMATCHES):
            chosen = _match_round(live, readers, stashed, num_gpus, excluded, waiting_for, height, highs)
            done = _feasible(chosen, live, readers, stashed, limit=1)
            if len(done) == len(chosen):
                break
            excluded |= set(chosen) - done
        done = done or set(chosen) or {min(i for i in live if i not in waiting_for)}  # always progress
        batch = []
        for held in stashed.values():
            for slot in [slot for slot, waiting in held.items() if not waiting - done]:
                del held[slot]
        for i in sorted(done, key=lambda i: (live[i].dst_rank, live[i].dst_slot)):
            m = live[i]
            later = readers.pop((m.dst_rank, m.dst_slot), set()) - done
            if later:  # save the slot's old payload before this round's write; later reads take it
                stashed[m.dst_rank][m.dst_slot] = set(later)
                batch.append(SlotMove(int(old.phy2log[m.dst_rank, m.dst_slot]), m.dst_rank, m.dst_slot,
                                      m.dst_rank, STASH, stash_of=m.dst_slot))
                for k in later:
                    r = live[k]
                    live[k] = SlotMove(r.expert, r.src_rank, STASH, r.dst_rank, r.dst_slot, stash_of=r.src_slot)
        for i in sorted(done, key=lambda i: (live[i].dst_rank, live[i].dst_slot)):
            m = live.pop(i)
            source = (m.src_rank, m.src_slot)
            if m.src_slot != STASH and source in readers:
                readers[source].discard(i)
                if not readers[source]:
                    del readers[source]
            batch.append(m)
            for k in children.pop(i, ()):  # relays from this slot may go from the next round on
                waiting_for.pop(k, None)
        rounds.append(tuple(batch))
    return MigrationPlan(tuple(rounds), changed, bound)


def _feasible(chosen, live, readers, stashed, limit: int) -> set[int]:
    """The largest subset of ``chosen`` whose ranks hold at most ``limit`` stashes each: a write
    into a slot with reads pending outside the subset stashes it, a stash whose reads are all in
    the subset is released (its read comes before the round's write)."""
    done = set(chosen)
    while True:
        drop = set()
        for i in done:
            m = live[i]
            if readers.get((m.dst_rank, m.dst_slot), set()) - done:
                kept = sum(bool(waiting - done) for waiting in stashed[m.dst_rank].values())
                if kept + 1 > limit:
                    drop.add(i)
        if not drop:
            return done
        done -= drop


def _move_weight(i: int, m: SlotMove, readers, stashed, height) -> float:
    if height[i]:  # the start of a chain of relays: the longest chain first (critical path)
        return _W_RELAY_SOURCE / height[i]
    later = readers.get((m.dst_rank, m.dst_slot), set()) - {i}
    if later:
        return _W_WAITS if stashed[m.dst_rank] else _W_NEEDS_STASH
    if m.src_slot == STASH or (m.src_rank, m.src_slot) in readers:
        return _W_UNBLOCKS
    return _W_PLAIN


def _match_round(live: dict[int, SlotMove], readers, stashed, num_gpus: int, excluded: set[int],
                 waiting_for: dict[int, int], height, highs: highspy.Highs) -> list[int]:
    """The moves of one round: a min-weight perfect matching of the remaining senders x receivers
    multigraph made regular with dummy edges (every rank of largest degree moves one slot)."""
    send = np.zeros(num_gpus, dtype=np.int64)
    receive = np.zeros(num_gpus, dtype=np.int64)
    best: dict[tuple[int, int], tuple[float, int]] = {}  # (sender, receiver) -> (weight, move)
    for i, m in live.items():
        send[m.src_rank] += 1
        receive[m.dst_rank] += 1
        idle = i in excluded or i in waiting_for  # matched only to keep the graph regular
        key = (_W_EXCLUDED if idle else _move_weight(i, m, readers, stashed, height), i)
        pair = (m.src_rank, m.dst_rank)
        if pair not in best or key < best[pair]:
            best[pair] = key
    degree = int(max(send.max(), receive.max()))
    weights = {pair: w for pair, (w, _) in best.items()}
    # Dummy edges pair up the senders and receivers short of `degree` (a Δ-regular multigraph).
    short_send, short_receive = degree - send, degree - receive
    s = r = 0
    while True:
        while s < num_gpus and short_send[s] == 0:
            s += 1
        while r < num_gpus and short_receive[r] == 0:
            r += 1
        if s == num_gpus or r == num_gpus:
            break
        amount = min(short_send[s], short_receive[r])
        short_send[s] -= amount
        short_receive[r] -= amount
        weights.setdefault((s, r), _W_DUMMY)
    pairs = sorted(weights)
    matched = _min_weight_perfect_matching(pairs, [weights[p] for p in pairs], num_gpus, highs)
    chosen = [best[p][1] for p in matched if p in best and best[p][0] < _W_EXCLUDED]
    return chosen


def _min_weight_perfect_matching(pairs: list[tuple[int, int]], weights: list[float], n: int,
                                 highs: highspy.Highs) -> list[tuple[int, int]]:
    """A min-weight perfect matching of the bipartite graph ``pairs`` (sender, receiver) on ``n + n``
    vertices, as the assignment LP (HiGHS: its vertex solutions are integral, Birkhoff)."""
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = len(pairs), 2 * n
    lp.col_cost_ = np.asarray(weights, dtype=np.float64)
    lp.col_lower_, lp.col_upper_ = np.zeros(len(pairs)), np.ones(len(pairs))
    lp.row_lower_ = lp.row_upper_ = np.ones(2 * n)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.arange(0, 2 * len(pairs) + 1, 2).astype(np.int32)
    lp.a_matrix_.index_ = np.array([[s, n + r] for s, r in pairs], dtype=np.int32).ravel()
    lp.a_matrix_.value_ = np.ones(2 * len(pairs))
    highs.passModel(lp)
    highs.run()
    x = np.asarray(highs.getSolution().col_value)
    matched = [pairs[k] for k in np.flatnonzero(x > 0.5)]
    if highs.getModelStatus() != highspy.HighsModelStatus.kOptimal or len(matched) != n \
            or np.any(np.abs(x - np.round(x)) > 1e-6):
        # Cannot happen for an assignment LP; still, a plan must come out (the same on every rank):
        # a greedy matching by weight is valid, only maybe longer.
        senders, receivers, matched = set(), set(), []
        for k in sorted(range(len(pairs)), key=lambda k: (weights[k], pairs[k])):
            s, r = pairs[k]
            if s not in senders and r not in receivers:
                senders.add(s)
                receivers.add(r)
                matched.append(pairs[k])
    return matched
