"""Dependencies point one way: the shard format lives in the engine, `preprocess` is a tool on top of it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_engine_imports_nothing_from_preprocess():
    offenders = {str(path.relative_to(REPO)): sorted(n for n in _imported_modules(path)
                                                     if n == "preprocess" or n.startswith("preprocess."))
                 for path in sorted((REPO / "engine").rglob("*.py"))}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_no_preprocess_file_passes_about_400_lines():
    lengths = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in (REPO / "preprocess").glob("*.py")}
    assert lengths and {path: n for path, n in lengths.items() if n > 420} == {}


def test_the_public_reader_stays_importable_from_preprocess():
    import engine.data.shards
    import preprocess.shards

    assert preprocess.shards.ShardReader is engine.data.shards.ShardReader
    assert preprocess.shards.PackedSequence is engine.data.shards.PackedSequence
