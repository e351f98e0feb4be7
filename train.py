"""KOALA distillation: `python train.py --config configs/<name>.py [--config.key=value ...]`.

The training loop itself is `koala_jax/train/loop.py` (data -> teacher & student -> losses -> update ->
checkpoint); the command line is `koala_jax/cli/train.py`.
"""

import sys

from koala_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
