"""Expert compute time per token of one MoE layer, for the re-placement time gate (paper Sec. 6.4).

``ExpertTimer`` hooks the layer's ``experts`` module and accumulates, since the last ``collect``,
the time of its forward calls and the token-expert assignments they processed (rows of the
dispatched input). On CUDA the time comes from ``torch.cuda.Event`` pairs recorded on the current
stream and read only at ``collect`` (no synchronisation in the training step); elsewhere from
``time.perf_counter`` around the (synchronous) call. Forwards re-run by activation recomputation
inside backward are not counted: they would count the same micro-batch twice; nor are forwards being
captured into a CUDA graph (their replays are not timed either: with graphed experts nothing is
timed and the policy falls back to its threshold alone, saying so in the check line).

What one rank measures is rank-local; the re-placement controller sums the integer totals over
the layer's MicroEP and expert-data-parallel groups (``replacement.agreed_ms_per_token``), so every
rank hands the policy the same number.
"""

from __future__ import annotations

import time

import torch

# Pending CUDA event pairs folded into the totals once this many accumulate (bounds memory on long
# check intervals; the oldest pairs have long completed, so reading them does not stall).
_MAX_PENDING = 256


class ExpertTimer:
    """Accumulates ``(nanoseconds, tokens)`` of ``experts``' forward calls since the last ``collect``.

    Args:
        experts: the layer's experts module (``MoELayer.experts``); its first positional input is
            the dispatched tokens ``[tokens, hidden]``.
    """

    def __init__(self, experts: torch.nn.Module):
        self.nanoseconds = 0
        self.tokens = 0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []
        self._started: tuple[object, int] | None = None
        self.handles = (experts.register_forward_pre_hook(self._before),
                        experts.register_forward_hook(self._after))

    def _before(self, module, args) -> None:
        if torch._C._current_graph_task_id() != -1:  # activation recompute inside backward
            self._started = None
            return
        hidden = args[0] if args else None
        tokens = int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) else 0
        if isinstance(hidden, torch.Tensor) and hidden.is_cuda:
            if torch.cuda.is_current_stream_capturing():  # a CUDA graph capture: timing events not allowed
                self._started = None
                return
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._started = (start, tokens)
        else:
            self._started = (time.perf_counter_ns(), tokens)

    def _after(self, module, args, output) -> None:
        if self._started is None:
            return
        start, tokens = self._started
        self._started = None
        if isinstance(start, int):
            self.nanoseconds += time.perf_counter_ns() - start
            self.tokens += tokens
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((start, end, tokens))
        if len(self._pending) >= _MAX_PENDING:
            self._fold(self._pending[:_MAX_PENDING // 2])
            del self._pending[:_MAX_PENDING // 2]

    def _fold(self, pairs) -> None:
        for start, end, tokens in pairs:
            end.synchronize()
            self.nanoseconds += int(round(start.elapsed_time(end) * 1e6))
            self.tokens += tokens

    def collect(self) -> tuple[int, int]:
        """``(nanoseconds, tokens)`` since the last call (waits for pending CUDA events), then resets."""
        self._fold(self._pending)
        self._pending.clear()
        totals = (self.nanoseconds, self.tokens)
        self.nanoseconds = self.tokens = 0
        return totals

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self.handles:
            handle.remove()
