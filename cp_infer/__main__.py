"""``python -m cp_infer``: see :mod:`cp_infer.cli`."""

import sys

from cp_infer.cli import main

sys.exit(main())
