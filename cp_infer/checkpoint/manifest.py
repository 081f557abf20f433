"""A sha256 per file of a checkpoint directory, in ``sha256sum``'s own format (``SHA256SUMS``).

Written by the converter, verified by every loader (``generate``, ``convert``): a corrupt,
truncated or missing file is refused by name before any of its bytes are used. The file is
plain text, so ``sha256sum -c SHA256SUMS`` checks a checkpoint without cp_infer.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from tqdm import tqdm

__all__ = ["MANIFEST", "sha256_file", "verify_manifest", "write_manifest"]

logger = logging.getLogger(__name__)

MANIFEST = "SHA256SUMS"
_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> Path:
    """Hash every file under ``directory`` (sub-folders included) into ``directory/SHA256SUMS``."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    lines = [f"{sha256_file(p)}  {p.relative_to(directory).as_posix()}\n" for p in files]
    out = directory / MANIFEST
    out.write_text("".join(lines))
    return out


def _entries(directory: Path) -> list[tuple[str, str]]:
    path = directory / MANIFEST
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise ValueError(f"{path}:{n} is not a sha256sum line; the manifest is damaged")
        entries.append((digest, name))
    return entries


def verify_manifest(
    directory: Path, *, part: int = 0, parts: int = 1, progress: bool = False
) -> int:
    """Check the files listed in ``directory/SHA256SUMS`` (every ``parts``-th from ``part``).

    Ranks can split the work: rank ``r`` of ``w`` checks ``part=r, parts=w``. A directory
    without a manifest is accepted as it is (checkpoints saved by other tools have none).

    Returns:
        The number of files checked here.

    Raises:
        ValueError: a listed file is missing or its sha256 differs; names the file.
    """
    directory = Path(directory)
    if not (directory / MANIFEST).exists():
        return 0
    mine = _entries(directory)[part::parts]
    for digest, name in tqdm(mine, desc="verifying sha256", unit="file", disable=not progress):
        path = directory / name
        if not path.is_file():
            raise ValueError(
                f"{path} is listed in {MANIFEST} but missing; copy or convert the checkpoint again"
            )
        if sha256_file(path) != digest:
            raise ValueError(
                f"{path} does not match its sha256 in {MANIFEST}: the file is corrupt or "
                "truncated; copy or convert the checkpoint again"
            )
    return len(mine)
