"""What the three click groups share: one-line errors, a JSON --config that fills option defaults, main(argv)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from diffusion.errors import UserError


def read_config_file(path: str) -> object:
    """JSON, YAML (.yaml/.yml) or TOML (.toml), by suffix."""
    text = Path(path).read_text()
    suffix = Path(path).suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    if suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    return json.loads(text)


def load_config_defaults(ctx: click.Context, _param, path: str | None) -> None:
    """--config FILE: option names (dashes or underscores) to values; the command line wins."""
    if not path:
        return
    try:
        values = read_config_file(path)
    except Exception as error:  # OSError and each format's own parse error
        raise click.BadParameter(f"cannot read {path}: {error}") from None
    if not isinstance(values, dict):
        raise click.BadParameter(f"{path} must hold a mapping of option names to values")
    ctx.default_map = {**(ctx.default_map or {}), **{k.replace("-", "_"): v for k, v in values.items()}}


config_option = click.option(
    "--config", type=click.Path(dir_okay=False), callback=load_config_defaults, is_eager=True, expose_value=False,
    help="JSON, YAML or TOML file of option values (the command line overrides them).",
)


def dataclass_option(config_class):
    """An `option(name, help, **click_kwargs)` factory whose --flags take their defaults from the config
    dataclass's fields: one source of truth for the command, the --config file and the code."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}

    def option(name: str, help: str, **kwargs):
        default = defaults.get(name, dataclasses.MISSING)
        if default is not dataclasses.MISSING and "default" not in kwargs:
            kwargs.update(default=default, show_default=default is not None)
        return click.option(f"--{name.replace('_', '-')}", name, help=help, **kwargs)

    return option


def run_group(group: click.Group, argv: list[str] | None) -> int:
    """Run a click group; a UserError is printed as one line and exits 2."""
    try:
        code = group.main(args=argv, prog_name=group.name, standalone_mode=False)
    except UserError as error:
        click.echo(f"Error: {error}", err=True)
        return 2
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1
    return code if isinstance(code, int) else 0  # without standalone mode, click returns Exit's code
