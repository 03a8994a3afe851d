"""The pure core imports no database, HTTP or other I/O library, nor the syncer's own edges."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "syncer" / "core"
FORBIDDEN = (
    "sqlalchemy", "alembic", "psycopg", "sqlite3", "aiohttp", "httpx", "uvloop", "socket",
    "asyncio", "apscheduler", "syncer.store", "syncer.delivery", "syncer.sync", "syncer.cli",
)  # fmt: skip


def imported_modules(source: str) -> set[str]:
    """Every module a source file imports, absolute names only."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda path: path.name)
def test_core_module_imports_nothing_with_io(path: Path) -> None:
    imported = imported_modules(path.read_text())
    bad = {
        name
        for name in imported
        for forbidden in FORBIDDEN
        if name == forbidden or name.startswith(forbidden + ".")
    }
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_check_sees_imports() -> None:
    assert imported_modules("import sqlalchemy\nfrom aiohttp import web") == {
        "sqlalchemy",
        "aiohttp",
    }
