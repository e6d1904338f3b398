"""The command-line parser of `kvd` and `kvctl`: usage errors are one line on stderr."""

from __future__ import annotations

import argparse
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``PROG: error: MESSAGE``, exit 2) instead of the
    usage text plus the error; ``-h`` still prints the usage. Subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")
