"""The package never imports the test suite (benchmarks and tools live in the package)."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "micromoe_megatron"


def test_package_never_imports_tests():
    offenders = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+tests(\.|\s|$)", path.read_text(), re.MULTILINE)]
    assert offenders == []
