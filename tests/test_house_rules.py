"""House rules read from the source: short library functions, no silent broad ``except``.

Library code is ``fiftyone_nola/`` and ``operators/``. A function's length is its lines from
``def`` to its last statement, its docstring excluded (documentation, not logic). A broad
handler (bare ``except``, ``Exception``, ``BaseException``) must re-raise, leave a line in a log
(``log.*``, ``logger.*``, a ``warn*`` call, ``handleError``) or carry the error on (its name used:
returned as a reason, re-raised elsewhere): an error that is swallowed must still be findable.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = sorted([*(REPO / "fiftyone_nola").rglob("*.py"), *(REPO / "operators").rglob("*.py")])
MAX_FUNCTION_LINES = 60
BROAD = {"Exception", "BaseException"}
LOGGERS = {"log", "logger", "_log", "LOG", "warnings"}


def _ids(paths):
    return [str(p.relative_to(REPO)) for p in paths]


def function_lengths(tree: ast.AST) -> list[tuple[str, int, int]]:
    """(name, first line, lines without the docstring) of every function in ``tree``."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        lines = node.end_lineno - start + 1
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            lines -= first.end_lineno - first.lineno + 1
        out.append((node.name, node.lineno, lines))
    return out


def _is_broad(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return handler.type is None or any(isinstance(k, ast.Name) and k.id in BROAD for k in kinds)


def _reports(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    owner = func.value if isinstance(func, ast.Attribute) else None
    return "warn" in name or name == "handleError" or (isinstance(owner, ast.Name) and owner.id in LOGGERS)


def _logs_or_raises(handler: ast.ExceptHandler) -> bool:
    for node in ast.walk(ast.Module(body=handler.body, type_ignores=[])):
        if isinstance(node, ast.Raise) or (isinstance(node, ast.Call) and _reports(node)):
            return True
        if handler.name and isinstance(node, ast.Name) and node.id == handler.name:
            return True
    return False


def silent_broad_handlers(tree: ast.AST) -> list[int]:
    """Line numbers of broad ``except`` clauses that neither re-raise nor log."""
    return [
        h.lineno for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and _is_broad(h) and not _logs_or_raises(h)
    ]


@pytest.mark.parametrize("path", LIBRARY, ids=_ids(LIBRARY))
def test_no_library_function_is_long(path):
    long = [(n, line, k) for n, line, k in function_lengths(ast.parse(path.read_text())) if k > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines (name, line, lines): {long}"


@pytest.mark.parametrize("path", LIBRARY, ids=_ids(LIBRARY))
def test_no_broad_except_is_silent(path):
    silent = silent_broad_handlers(ast.parse(path.read_text()))
    assert not silent, f"{path.name}: broad except without a log line or re-raise at lines {silent}"


def test_the_rules_see_what_they_forbid():
    src = '''
def short():
    """Doc
    on lines."""
    return 1

def swallow():
    try:
        pass
    except Exception:
        pass

def logged():
    try:
        pass
    except Exception as e:
        log.debug("x %s", e)

def reraised():
    try:
        pass
    except BaseException:
        cleanup()
        raise

def narrow():
    try:
        pass
    except OSError:
        pass

def bare():
    try:
        pass
    except:
        pass

def carried():
    try:
        pass
    except Exception as e:
        return f"failed: {e}"

def bound_unused():
    try:
        pass
    except Exception as e:
        return None

def warned():
    try:
        pass
    except Exception:
        warn_once("x")
'''
    src += "def long():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES) + "    return x\n"
    tree = ast.parse(src)
    lengths = {n: k for n, _, k in function_lengths(tree)}
    assert lengths["short"] == 2 and lengths["long"] == MAX_FUNCTION_LINES + 2
    lines = src.splitlines()
    silent = [lines[i - 1].strip() for i in silent_broad_handlers(tree)]
    assert silent == ["except Exception:", "except:", "except Exception as e:"]
