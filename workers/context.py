"""The worker process's engine and Redis connection, created on first use (after any fork)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from redis import Redis
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker
from app.settings import Settings, get_settings


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    redis: Redis | None


@lru_cache
def _context(pid: int) -> WorkerContext:
    settings = get_settings()
    redis = Redis.from_url(settings.redis_url) if settings.redis_url else None
    return WorkerContext(settings, make_sessionmaker(make_engine(settings)), redis)


def context() -> WorkerContext:
    """This process's context; a forked child gets its own engine, never its parent's."""
    return _context(os.getpid())
