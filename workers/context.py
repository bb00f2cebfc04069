"""The worker process's engine and Redis connection, created on first use (after any fork)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from redis import Redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker
from app.settings import Settings, get_settings


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    redis: Redis | None


@lru_cache
def _context(pid: int) -> WorkerContext:
    settings = get_settings()
    redis = Redis.from_url(settings.redis_url) if settings.redis_url else None
    engine = make_engine(settings)
    return WorkerContext(settings, engine, make_sessionmaker(engine), redis)


def context() -> WorkerContext:
    """This process's context; a forked child gets its own engine, never its parent's."""
    return _context(os.getpid())


def reset_context() -> None:
    """Close this process's connections and forget them (settings changed, or shutting down)."""
    if _context.cache_info().currsize:
        ctx = context()
        ctx.engine.dispose()
        if ctx.redis is not None:
            ctx.redis.close()
    _context.cache_clear()
