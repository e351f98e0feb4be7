"""Test-wide settings. XLA's CPU backend spends most of a small test's time compiling; a lower LLVM
optimisation level halves that and changes no result beyond float32 rounding."""

import os

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
