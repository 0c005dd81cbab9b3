"""DESIGN.md section 4: arrows point one way, cluster -> services -> eft_core."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

IMPORT_ALL_WITH_BLOCKED_MODULES = """
import importlib, importlib.abc, pkgutil, sys
BLOCKED = {blocked!r}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked for this test")

sys.meta_path.insert(0, Blocker())
{preamble}
import {package}
for module in pkgutil.walk_packages({package}.__path__, "{package}."):
    importlib.import_module(module.name)
print("imported", sorted(m for m in sys.modules if m.startswith("{package}")))
"""


def import_with_blocked(package: str, blocked: set[str], preamble: str = "") -> subprocess.CompletedProcess:
    code = IMPORT_ALL_WITH_BLOCKED_MODULES.format(blocked=sorted(blocked), package=package, preamble=preamble)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_eft_core_imports_with_ray_grpc_transformers_and_pydantic_blocked():
    result = import_with_blocked("eft_core", {"ray", "grpc", "transformers", "pydantic", "services", "cluster"})
    assert result.returncode == 0, result.stderr
    assert "eft_core.speculative" in result.stdout and "eft_core.reference" in result.stdout


def test_the_blocker_really_blocks():
    result = import_with_blocked("eft_core", {"ray", "grpc", "transformers", "pydantic"}, preamble="import pydantic")
    assert result.returncode != 0 and "pydantic is blocked" in result.stderr


def imported_top_levels(package: str) -> dict[str, set[str]]:
    """Top-level modules each file of a package imports, read statically."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("eft_core", {"ray", "grpc", "transformers", "pydantic", "services", "cluster"}),
        ("services", {"ray", "cluster"}),
    ],
)
def test_no_package_imports_upward(package, forbidden):
    offenders = {path: names & forbidden for path, names in imported_top_levels(package).items() if names & forbidden}
    assert not offenders
