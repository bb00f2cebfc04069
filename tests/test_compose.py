"""docker-compose.yml describes the production stack with real `gzx` commands (no Docker engine
runs here, so the file is parsed and every command checked against the CLI)."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.main import get_command

from app.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def test_every_gzx_service_runs_a_real_gzx_subcommand() -> None:
    """api, worker and cron (and migrate) run `gzx <subcommand>` with options the CLI accepts."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "api", "worker", "cron"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    group = get_command(cli)
    for name in ("api", "worker", "cron", "migrate"):
        command = services[name]["command"]
        assert command[0] == "gzx", name
        sub = group.commands[command[1]]  # type: ignore[attr-defined]
        context = sub.make_context(command[1], list(command[2:]))
        assert context.params is not None
        env = services[name]["environment"]
        assert env["GZX_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["GZX_REDIS_URL"].startswith("redis://")
