"""Encode image-caption pairs once with the teacher's VAE and text encoders: see
`koala_jax/cli/prepare.py` or `python prepare_data.py --help`."""

import sys

from koala_jax.cli.prepare import main

if __name__ == "__main__":
    sys.exit(main())
