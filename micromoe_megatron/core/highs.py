"""One way to make a HiGHS solver: quiet, single-threaded, deterministic dual simplex."""

from __future__ import annotations

import contextlib
import os

import highspy

# Single-threaded dual simplex without presolve: the same model gives the same path on every rank.
DETERMINISTIC_OPTIONS = (("output_flag", False), ("threads", 1), ("presolve", "off"),
                         ("solver", "simplex"), ("simplex_strategy", 1))


@contextlib.contextmanager
def quiet_stdout():
    """Silence C-level stdout: ``highspy.Highs()`` prints a banner before options can be set."""
    try:
        fd = os.dup(1)
    except OSError:  # no real stdout (e.g. captured by a harness): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(fd, 1)
        os.close(fd)


def new_highs(lp: highspy.HighsLp, options=DETERMINISTIC_OPTIONS) -> highspy.Highs:
    """A HiGHS solver holding ``lp``, with ``options`` ((name, value) pairs) set."""
    with quiet_stdout():
        highs = highspy.Highs()
    for name, value in options:
        highs.setOptionValue(name, value)
    highs.passModel(lp)
    return highs
