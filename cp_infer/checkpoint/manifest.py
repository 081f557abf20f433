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

__all__ = ["MANIFEST", "sampled_digest", "sha256_file", "verify_manifest", "write_manifest"]

logger = logging.getLogger(__name__)

MANIFEST = "SHA256SUMS"
_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sampled_digest(path: Path, sample: int = 1 << 16) -> str:
    """A quick identity of a checkpoint (a file or a directory): every file's name and size,
    and ``sample`` bytes at its start, middle and end (its ``SHA256SUMS`` when it has one, in
    full). Two checkpoints that differ in any header, in any file's size or in a sampled
    weight differ here; reading it costs milliseconds however large the weights are."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and not p.name.startswith("."))  # fmt: skip
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(path) if p != path else p.name}\0{size}\0".encode())
        with open(p, "rb") as f:
            if p.name == MANIFEST:
                h.update(f.read())
                continue
            for at in sorted({0, max(size // 2 - sample // 2, 0), max(size - sample, 0)}):
                f.seek(at)
                h.update(f.read(sample))
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
