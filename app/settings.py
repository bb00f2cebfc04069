"""Settings, read from environment variables prefixed GZX_ (one class, passed explicitly)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything gzx reads from its environment.

    `database_url` defaults to a SQLite file in the working directory (the embedded mode);
    `redis_url` unset means jobs run in-process (no worker, no Redis).
    Tokens are `TOKEN=scope1,scope2` pairs separated by `;` (scopes: ingest, read, admin).
    """

    model_config = SettingsConfigDict(env_prefix="GZX_", extra="ignore")

    database_url: str = "sqlite:///gzx.db"
    redis_url: str | None = None
    tokens: str = Field(default="", repr=False)
    kinesis_username: str | None = None
    kinesis_password: str | None = Field(default=None, repr=False)
    caesar_secret: str | None = Field(default=None, repr=False)
    ip_salt: str = Field(default="gzx-default-salt", repr=False)
    export_dir: Path = Path("exports")
    # The train queue (workers/train.py): subject images named "<subject id>.<ext>" (in
    # images_dir/<workflow id>/ when that exists), trained models, and where predictions go.
    images_dir: Path = Path("images")
    model_dir: Path = Path("models")
    api_url: str | None = None
    api_token: str | None = Field(default=None, repr=False)
    train_epochs: int = Field(default=10, ge=1)
    train_iterations: int | None = Field(default=None, ge=1)  # caps the epochs when set
    panoptes_endpoint: str = "https://www.zooniverse.org"
    panoptes_client_id: str | None = None
    panoptes_client_secret: str | None = Field(default=None, repr=False)
    caesar_token: str | None = Field(default=None, repr=False)
    max_body_bytes: int = 10 * 1024 * 1024
    max_marks_per_classification: int = 1000
    sweep_interval_s: float = 30.0
    # Subjects applied per transaction. Their rows stay locked until it commits, and ingest
    # waits on them (benchmarks/load.py: 500 stalled ingest for seconds, 50 kept 500/s).
    apply_batch_size: int = 50
    commit_window_ms: float = 2.0

    @field_validator("database_url")
    @classmethod
    def _use_psycopg3(cls, value: str) -> str:
        """Accept the URLs platforms hand out (`postgres://`) and pick the psycopg 3 driver."""
        for prefix in ("postgres://", "postgresql://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value[len(prefix) :]
        return value

    @field_validator("redis_url")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def token_scopes(self) -> dict[str, frozenset[str]]:
        """The configured bearer tokens and their scopes."""
        tokens: dict[str, frozenset[str]] = {}
        for pair in self.tokens.split(";"):
            if not pair.strip():
                continue
            token, _, scopes = pair.strip().partition("=")
            tokens[token.strip()] = frozenset(s.strip() for s in scopes.split(",") if s.strip())
        return tokens

    @property
    def has_credentials(self) -> bool:
        return bool(self.token_scopes() or self.kinesis_password or self.caesar_secret)


@lru_cache
def get_settings() -> Settings:
    """The settings of this process, read once."""
    return Settings()
