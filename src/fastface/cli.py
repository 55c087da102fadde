"""The ``fastface`` command line.

Each subsystem registers its own sub-commands (``register(subparsers)``) so that this file stays
a thin dispatcher. User errors (:class:`fastface.errors.FastFaceError`) print one line
``error: …`` and exit with status 2; argparse usage errors exit 2 as well.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import FastFaceError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        sys.stderr.write(f"error: {message}\n")
        sys.exit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="fastface", description="Fast identity-preserving image generation.")
    parser.add_argument("--version", action="version", version=f"fastface {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    from . import commands

    commands.register(sub)
    for module_name in (
        "fastface.faces.cli", "fastface.doctor", "fastface.evaluation.cli", "fastface.bench", "fastface.serve.cli",
    ):
        module = _optional_module(module_name)
        if module is not None:
            module.register(sub)
    return parser


def _optional_module(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            return None  # that subsystem is not part of this build
        raise


def main(argv: Sequence[str] | None = None) -> int:
    import os

    # The CLI owns its process: keep library chatter (load-time notices about optional torchvision
    # image processors or LoRA prefixes) off the terminal unless the user asks for it.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FastFaceError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except OSError as exc:
        from .atomic import DiskFullError, is_disk_full

        if not is_disk_full(exc):
            raise
        # A writer that does not name its file (a plot, a library's cache) still gets one line.
        sys.stderr.write(f"error: {DiskFullError(exc.filename or 'an output file')}\n")
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
