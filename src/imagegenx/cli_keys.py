"""`imagegenx keys create|list|revoke`: API keys; only their hashes are stored."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from imagegenx.config import Settings


def _fail(message: str) -> typer.Exit:
    from imagegenx.cli import _fail as fail

    return fail(message)


keys_app = typer.Typer(help="API keys: only their hashes are stored; a secret is shown once, at creation.")


def _task_store(settings: Settings):
    from imagegenx.storage.tasks import TaskStore

    return TaskStore(settings.storage.database_url)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="A label for the key's owner.")],
    tier: Annotated[str, typer.Option(help="free (up to 1024x1024) or paid")] = "free",
    rate: Annotated[float, typer.Option(help="Requests per second.")] = 30.0,
    quota: Annotated[int, typer.Option(help="Tasks queued or running at once.")] = 100,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the secret.")] = False,
) -> None:
    """Create a key and print its secret (the only time it is shown)."""
    from imagegenx.types import Tier

    try:
        tier_value = Tier(tier)
    except ValueError:
        raise _fail(f"unknown tier {tier!r}; use free or paid") from None
    key, secret = _task_store(Settings()).create_key(name, tier_value, rate, quota)
    if quiet:
        typer.echo(secret)
    else:
        typer.echo(f"key id: {key.key_id}  tier: {key.tier}\nsecret (shown once): {secret}")


@keys_app.command("list")
def keys_list() -> None:
    """All keys, without secrets."""
    table = Table("key id", "name", "tier", "rate/s", "quota", "revoked")
    for key in _task_store(Settings()).list_keys():
        table.add_row(
            key.key_id,
            key.name,
            str(key.tier),
            f"{key.rate_limit_per_s:g}",
            str(key.queue_quota),
            "yes" if key.revoked_at else "",
        )
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument()]) -> None:
    """Revoke a key: refused on the next request."""
    if not _task_store(Settings()).revoke_key(key_id):
        raise _fail(f"no key {key_id!r}")
    typer.echo(f"revoked {key_id}")
