FROM python:3.11-slim
WORKDIR /srv/gzx
COPY pyproject.toml README.md alembic.ini ./
COPY app app
COPY workers workers
COPY migrations migrations
RUN pip install --no-cache-dir .
ENV GZX_EXPORT_DIR=/data/exports
CMD ["gzx", "serve", "--host", "0.0.0.0"]
