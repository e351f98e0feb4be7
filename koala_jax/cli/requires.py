"""Whether the PyTorch side is installed, and the one error of a command that needs it when it is not.

The README's first install (`pip install -e .`) brings no torch: training, `sample.py --backend jax`, the
tiny-world evaluation and the converter's safetensors paths run without it. A command whose path needs torch
(diffusers sampling, the real-model metrics, prepare_data.py's torch backend, the converter's pickle readers)
asks `require_torch` before it loads anything, so a missing torch is one line naming the install command and
the torch-free alternative, not a `ModuleNotFoundError` traceback from deep inside. Nothing is imported here:
the packages are looked up on the import path (fast, and the command layer stays free of torch).
"""

from __future__ import annotations

import importlib.util
import sys

from koala_jax.errors import KoalaError

# The README's test install, the CPU build (a bare `torch` makes pip fetch a multi-GB CUDA build).
TORCH_INSTALL = 'pip install torch==2.13.0 && pip install -e ".[torch]"'
# What the `[torch]` extra brings that the PyTorch paths import first.
TORCH_PACKAGES = ("torch", "diffusers")


class TorchMissingError(KoalaError, ModuleNotFoundError):
    """A command's path needs PyTorch, which is not installed; the message says how to install it or avoid it."""


def importable(name: str) -> bool:
    """Whether top-level package `name` can be imported, without importing it (a `sys.modules` entry of None,
    which is how Python marks a blocked import, counts as not importable)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def torch_available() -> bool:
    """Whether torch and diffusers can both be imported."""
    return all(importable(name) for name in TORCH_PACKAGES)


def require_torch(what: str, alternative: str | None = None) -> None:
    """Refuse `what` (e.g. "--backend diffusers") in one line when torch is missing, naming the install
    command and `alternative` (e.g. "--backend jax, which needs no torch") when there is one."""
    if torch_available():
        return
    missing = " and ".join(name for name in TORCH_PACKAGES if not importable(name))
    instead = f", or use {alternative}" if alternative else ""
    raise TorchMissingError(f"{what} needs PyTorch ({missing} not installed): install it with {TORCH_INSTALL}{instead}")
