# copernica-relay: one image for every process type (the Procfile's commands).
#   web:     the default command (gunicorn on $PORT, default 8000)
#   worker:  docker run ... python -m worker
#   check:   docker run ... python -m app check   (before web and workers start)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLASK_APP=app \
    PORT=8000

WORKDIR /srv/relay
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY app ./app
COPY worker ./worker
COPY gunicorn.conf.py ./

# The relay needs no privileges; it never writes to its own files.
RUN useradd --system --uid 10001 --no-create-home relay
USER relay

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=2)"

CMD ["gunicorn", "--config", "gunicorn.conf.py", "app:create_app()"]
