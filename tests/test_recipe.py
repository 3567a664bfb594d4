"""The README's "Use it from your own training script" recipe runs as printed and trains like stock EP."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def recipe_code() -> str:
    text = README.read_text()
    section = text[text.index("## Use it from your own training script"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the recipe section has no python block"
    return match.group(1)


def test_recipe_names_the_public_api():
    code = recipe_code()
    for name in ("use_micro_ep", "ReplicaSync", "attach", "finalize_model_grads_func", "MicroEPConfig"):
        assert name in code


def test_recipe_trains_like_stock_ep(rank_pool):
    code = recipe_code()
    micro = rank_pool.run("tests.recipe_cases:run_recipe", code=code, micro_ep=True)
    stock = rank_pool.run("tests.recipe_cases:run_recipe", code=code, micro_ep=False)
    assert micro[0] == pytest.approx(stock[0], rel=1e-6)
    assert all(losses == micro[0] for losses in micro)
