"""The one base class of user-facing errors.

Everything a user can cause (a missing or damaged file, an unsupported config field, inconsistent
settings) raises a `KoalaError` subclass whose message says what is wrong and where. The commands
(`koala_jax.cli.runner`) print it as one line, `error: <message>`, and exit with status 1; a
traceback is shown only with `--debug`. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class KoalaError(Exception):
    """A mistake in the user's inputs, outputs or settings; the message is shown as is."""

    def __str__(self) -> str:  # Subclasses that are also KeyErrors would otherwise quote the message.
        return str(self.args[0]) if self.args else ""


class MissingPathError(KoalaError, FileNotFoundError):
    """A file or folder the user named does not exist or is not what it should be."""


class ConvertError(KoalaError, ValueError):
    """A weights source or output that cannot be read, converted or written; names the file and the problem."""


class DataError(KoalaError, ValueError):
    """An input collection, prepared dataset or data setting that cannot be used as given."""


class ConfigError(KoalaError, ValueError):
    """Settings that are unknown, out of range, or contradict each other or the models."""


class DiskFullError(KoalaError, OSError):
    """Not enough space for an output; names the path, the bytes needed (where known) and the bytes free."""
