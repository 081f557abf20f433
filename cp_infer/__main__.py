"""``python -m cp_infer``: see :mod:`cp_infer.cli`."""

import sys

from cp_infer.cli import main

if __name__ == "__main__":
    sys.exit(main())
