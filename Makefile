# Short names for the commands the README gives.
.PHONY: run test lint bench

run:  ## install and run gzx on the embedded default (SQLite, in-process jobs)
	bash scripts/run.sh

test:  ## install what the tests need, start PostgreSQL and Redis if down, run the suite
	bash scripts/test.sh

lint:  ## ruff (check + format) and mypy strict
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

bench:  ## the benchmarks (need ../shared/data and the bench extra)
	.venv/bin/pip install -q -e '.[bench]'
	.venv/bin/python benchmarks/ingest.py
	.venv/bin/python benchmarks/accuracy.py
