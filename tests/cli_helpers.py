"""Running the `fusion` CLI as a user does: a subprocess of this interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def fusion(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
