"""The README's table of error codes is the list of codes the gateway can give: every code
raised in gateway/ or wire/ is in it, and every code in it is raised somewhere."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from wire import errors

ROOT = Path(__file__).resolve().parents[2]
# The parameters that carry an error's `code`: APIError's and error_payload's `code`, and
# UpstreamError's `kind`, which becomes the code the client sees.
CODE_PARAMETERS = {"code", "kind"}


def table_codes() -> set[str]:
    """The backticked codes in the third column of the README's `| situation | status |
    \\`code\\` |` table."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("| situation |"))
    codes: set[str] = set()
    for line in lines[start + 2 :]:
        if not line.strip().startswith("|"):
            break
        code_cell = line.strip().strip("|").split("|")[2]
        codes.update(re.findall(r"`([a-z_]+)`", code_cell))
    return codes


def _callee(module: ModuleType, func: ast.expr) -> Any:
    if isinstance(func, ast.Name):
        return getattr(module, func.id, None)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return getattr(getattr(module, func.value.id, None), func.attr, None)
    return None


def _string(module: ModuleType, node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and isinstance(getattr(module, node.id, None), str):
        return getattr(module, node.id)  # a module constant
    return None


def raised_codes() -> dict[str, list[str]]:
    """Each string given as `code`/`kind` to any call in gateway/ or wire/, with where.
    Positional arguments are matched to parameters through the callee's real signature,
    so the constructors may take them either way."""
    found: dict[str, list[str]] = {}
    for path in sorted([*(ROOT / "gateway").rglob("*.py"), *(ROOT / "wire").rglob("*.py")]):
        relative = path.relative_to(ROOT)
        module = importlib.import_module(
            ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        )
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            callee = _callee(module, node.func)
            if not callable(callee):
                continue
            try:
                signature = inspect.signature(callee)
            except (TypeError, ValueError):
                continue
            if not CODE_PARAMETERS & set(signature.parameters):
                continue
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            try:
                bound = signature.bind_partial(*node.args, **keywords)
            except TypeError:
                continue
            for name, value in bound.arguments.items():
                code = _string(module, value) if name in CODE_PARAMETERS else None
                if code is not None:
                    found.setdefault(code, []).append(f"{relative}:{node.lineno}")
            # A constructor's default code is raised by every call that leaves it out
            # (`APIError.rate_limited(...)` is `rate_limit_exceeded`).
            for name in CODE_PARAMETERS & (set(signature.parameters) - set(bound.arguments)):
                default = signature.parameters[name].default
                if isinstance(default, str):
                    found.setdefault(default, []).append(f"{relative}:{node.lineno}")
    # The codes of the HTTP errors aiohttp raises (unknown route, method, body size).
    for _type, code in errors._HTTP_ERRORS.values():
        found.setdefault(code, []).append("wire/errors.py:_HTTP_ERRORS")
    return found


def test_the_scan_finds_codes_both_ways() -> None:
    """The scan itself: positional (`UpstreamError("refused", ...)`) and keyword codes."""
    raised = raised_codes()
    assert {"refused", "timeout_idle", "invalid_json", "not_found"} <= set(raised)


def test_every_code_raised_is_in_the_readme_table() -> None:
    raised = raised_codes()
    missing = {code: raised[code] for code in sorted(set(raised) - table_codes())}
    assert not missing, f"codes the README's error table does not list: {missing}"


def test_every_code_in_the_readme_table_is_raised() -> None:
    stale = sorted(table_codes() - set(raised_codes()))
    assert not stale, f"codes in the README's error table that nothing raises: {stale}"
