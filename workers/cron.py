"""Schedules for `rq cron` (`gzx cron` runs it with this file): the sweeper every 30 s, and
every minute the job that starts the refits (and exports) whose workflow interval has passed."""

from rq import cron

from app.pipeline import AGGREGATE_QUEUE
from workers.jobs import run_schedules, sweep

cron.register(sweep, queue_name=AGGREGATE_QUEUE, interval=30)
cron.register(run_schedules, queue_name=AGGREGATE_QUEUE, interval=60)
