"""ruff (configured in pyproject.toml) passes on the whole tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _calls(name: str):
    """(file, call node) for every call of `name` (a function or a method) in the package."""
    import ast

    for path in sorted(ROOT.glob("*/**/*.py")):
        if path.parts[len(ROOT.parts)] not in ("search", "storage", "spaces", "benchmarks"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    yield path.relative_to(ROOT), node


def test_every_torch_load_is_weights_only():
    """No pickled code can run from a file this service reads."""
    import ast

    loads = list(_calls("load"))
    torch_loads = [(p, n) for p, n in loads if isinstance(n.func, ast.Attribute)
                   and getattr(n.func.value, "id", "") == "torch"]
    assert torch_loads, "no torch.load found: the scan is broken"
    for path, node in torch_loads:
        flags = {k.arg: k.value for k in node.keywords}
        assert isinstance(flags.get("weights_only"), ast.Constant) and flags[
            "weights_only"].value is True, f"{path}:{node.lineno} torch.load without weights_only"


def test_text_files_are_read_and_written_as_utf8():
    """Reports and JSON are UTF-8 on every OS, whatever the locale's encoding."""
    import ast

    for method in ("write_text", "read_text"):
        for path, node in _calls(method):
            assert any(k.arg == "encoding" for k in node.keywords), (
                f"{path}:{node.lineno} {method} without encoding='utf-8'")
    for path, node in _calls("open"):
        mode = node.args[1] if len(node.args) > 1 else next(
            (k.value for k in node.keywords if k.arg == "mode"), None)
        binary = isinstance(mode, ast.Constant) and "b" in str(mode.value)
        if isinstance(node.func, ast.Name) and not binary:  # the builtin open, in text mode
            assert any(k.arg == "encoding" for k in node.keywords), (
                f"{path}:{node.lineno} open() in text mode without encoding")


def test_storage_urls_are_logged_masked():
    """Every place that writes a storage URL for people to read goes through storage.shown."""
    import re

    for path in sorted(ROOT.glob("search/**/*.py")):
        text = path.read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), 1):
            if re.search(r"(log\.\w+|print|f\").*\bcfg\.storage\b", line):
                assert "shown(cfg.storage)" in line or "storage.open(cfg.storage)" in line, (
                    f"{path.relative_to(ROOT)}:{number} writes cfg.storage unmasked")
