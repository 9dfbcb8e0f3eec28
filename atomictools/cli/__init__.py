"""The command line (``atomictools serve|recover|write|...``) and the demo client."""

from atomictools.cli.commands import main

__all__ = ["main"]
