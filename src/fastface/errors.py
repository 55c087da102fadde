"""User-facing errors.

Every error a user can cause by what they pass in (a path, a name, a number) is a
:class:`FastFaceError`. The CLI prints it as one line ``error: <message>`` and exits with
status 2; the Python API raises it as is. Anything else escaping is a bug.
"""

from __future__ import annotations


class FastFaceError(Exception):
    """Base class of errors caused by user input or environment, never by a bug."""


class ConfigError(FastFaceError, ValueError):
    """An unknown preset/backbone/adapter name, a bad option value, a schedule of the wrong length."""


class InputError(FastFaceError, ValueError):
    """An input file that cannot be used: missing, unreadable, not an image, wrong embedding size."""


class NoFaceError(InputError):
    """A photo in which no face was found."""


class MissingWeightsError(FastFaceError, FileNotFoundError):
    """Model weights that are neither local nor downloadable (typically: offline)."""
