"""The `gpo-fast` command line (Typer). Thin: each command parses, validates and calls the library."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="gpo-fast",
    help="Group Preference Optimization for text-to-image diffusion models, on one GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        from gpo_fast import __version__

        typer.echo(f"gpo-fast {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Group Preference Optimization for text-to-image diffusion models, on one GPU."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
