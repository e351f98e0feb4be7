"""Convert SDXL-family U-Net weights, derive KOALA students, export diffusers folders: see
`koala_jax/cli/convert.py` or `python convert_weights.py --help`."""

import sys

from koala_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
