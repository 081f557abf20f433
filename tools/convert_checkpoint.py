"""Convert a checkpoint between Hugging Face and megatron-core formats.

The same command as ``python -m cp_infer convert`` (same arguments; see ``--help``)::

    python tools/convert_checkpoint.py --from hf --to megatron --input ./llama --output ./mcore
"""

import sys

from cp_infer.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
