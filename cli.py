"""`collector`: the command line, a thin shell over the `collector` package.

collector serve                 run the events server on the embedded defaults
collector keys create|list|revoke   manage the API keys clients use
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from collector.auth import SCOPES, KeyStore, ensure_first_key, now_utc
from collector.settings import ConfigFileError, Settings, load_settings

app = typer.Typer(help="Edge collector for Traffical experiment events.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage the API keys clients use.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="TOML settings file (default /etc/collector/collector.toml)."),
]
DataDirOption = Annotated[
    Path | None, typer.Option("--data-dir", help="Data directory (COLLECTOR_DATA_DIR).")
]


def settings_or_exit(config: Path | None, **flags: Any) -> Settings:
    """Settings, or a one-line error naming the bad file or key and exit status 2."""
    try:
        return load_settings(config, **flags)
    except ConfigFileError as exc:
        typer.echo(f"error: {exc}", err=True)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            name = ".".join(map(str, error["loc"]))
            typer.echo(f"error: setting '{name}': {error['msg']}", err=True)
    raise typer.Exit(2)


@app.command()
def serve(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (COLLECTOR_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (COLLECTOR_PORT).")] = None,
) -> None:
    """Run the events server. Example: collector serve --port 8787"""
    import uvicorn

    from collector.app import create_app

    settings = settings_or_exit(config, data_dir=data_dir, host=host, port=port)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    first = ensure_first_key(KeyStore(settings.keys_file))
    if first is not None:
        typer.echo("No API key existed, so one was created. It is shown only this once:")
        typer.echo(first)
    logging.getLogger("collector.server").info(
        "serving on http://%s:%d, queue in %s (sync=%s)",
        settings.host,
        settings.port,
        settings.data_dir,
        settings.sync,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        loop="uvloop",
        http="httptools",
        # A client that trickles its body or sits idle is dropped after this many seconds.
        timeout_keep_alive=30,
    )


@keys_app.command("create")
def keys_create(
    scope: Annotated[
        list[str], typer.Option(help=f"Scope to grant, repeatable: {', '.join(SCOPES)}.")
    ],
    project: Annotated[str | None, typer.Option(help="Restrict the key to this project.")] = None,
    env: Annotated[str | None, typer.Option(help="Restrict the key to this environment.")] = None,
    expires: Annotated[
        datetime | None, typer.Option(help="Expiry, ISO 8601 (UTC when no offset).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="A name to find the key by.")] = None,
    publishable: Annotated[
        bool, typer.Option(help="Make a traffical_pk_ key, safe to ship in browsers.")
    ] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Create a key; its secret is printed alone on the last line, once.

    Example: collector keys create --scope sdk:write --project web --name web-prod
    """
    settings = settings_or_exit(config, data_dir=data_dir)
    store = KeyStore(settings.keys_file)
    try:
        key, secret = store.create(
            scope, name=name, project=project, env=env, expires=expires, publishable=publishable
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"Created key '{key.name}' ({', '.join(key.scopes)}). Its secret, shown once:")
    typer.echo(secret)


@keys_app.command("list")
def keys_list(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """List the keys (never their secrets). Example: collector keys list"""
    settings = settings_or_exit(config, data_dir=data_dir)
    table = Table("name", "prefix", "scopes", "project", "env", "expires", "status")
    now = now_utc()
    for key in KeyStore(settings.keys_file).list_keys():
        table.add_row(
            key.name,
            key.prefix + "…",
            " ".join(key.scopes),
            key.project or "any",
            key.env or "any",
            key.expires or "never",
            key.status(now),
        )
    Console(width=200).print(table)


@keys_app.command("revoke")
def keys_revoke(
    name_or_prefix: Annotated[str, typer.Argument(help="The key's name or the start of it.")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a key at once, without a restart. Example: collector keys revoke web-prod"""
    settings = settings_or_exit(config, data_dir=data_dir)
    try:
        key = KeyStore(settings.keys_file).revoke(name_or_prefix)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"Revoked key '{key.name}' ({key.prefix}…).")


def main() -> None:
    app(prog_name="collector")


if __name__ == "__main__":
    main()
