"""`trainer`: its commands land with their own issues (see README.md)."""

from __future__ import annotations

import sys

import click

from diffusion.cli import run_group


@click.group(name="trainer")
def cli() -> None:
    """Not built yet: see README.md for the state of each stage."""


def main(argv: list[str] | None = None) -> int:
    return run_group(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
