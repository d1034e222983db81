"""The header every benchmark prints first: when, which code, on what machine.

    python benchmarks/machine.py    # prints it alone
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's search package
from search.config import cpu_name  # noqa: E402


def _commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}{' (with uncommitted changes)' if dirty.strip() else ''}" or "unknown"


def header(command: str | None = None) -> str:
    """Date, commit, CPU model and cores, GPUs, OS, Python, torch and Optuna, the command."""
    import optuna
    import torch

    gpus = "none"
    if torch.cuda.is_available():
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    lines = [
        f"date     {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"commit   {_commit()}",
        f"cpu      {cpu_name()}, {os.cpu_count()} cores",
        f"gpu      {gpus}",
        f"os       {platform.platform()}",
        f"versions python {platform.python_version()}, torch {torch.__version__}, "
        f"optuna {optuna.__version__}",
        f"command  {command or ' '.join(['python', *sys.argv])}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(header())
