"""The commands (train, convert, sample, prepare, evaluate, world): argument parsing and one error policy
(`runner.run`). The top-level scripts train.py, convert_weights.py, sample.py, prepare_data.py and evaluate.py
are shims that call these.

The console is for people: transformers and diffusers keep their warnings (e.g. "PyTorch was not found", which
a torch-free install of the main job would print on every run) to themselves unless the user asks for them
with TRANSFORMERS_VERBOSITY / DIFFUSERS_VERBOSITY; set here, before any command imports either library."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
