"""Schedules for `rq cron` (`gzx cron` runs it with this file): the sweeper, every 30 s."""

from rq import cron

from app.pipeline import AGGREGATE_QUEUE
from workers.jobs import sweep

cron.register(sweep, queue_name=AGGREGATE_QUEUE, interval=30)
