"""Generate images from an exported KOALA student (or any SDXL pipeline): see `koala_jax/cli/sample.py`
or `python sample.py --help`."""

import sys

from koala_jax.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
