"""Evaluate text-to-image models side by side (attribute accuracy in the tiny world, teacher-student agreement):
see `koala_jax/cli/evaluate.py` or `python evaluate.py --help`."""

import sys

from koala_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
