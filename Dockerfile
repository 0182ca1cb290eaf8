# The proxy image. It installs exactly as the Makefile does: requirements.txt, then the project itself.
FROM python:3.11-slim
WORKDIR /app
# torch==2.13.0 from PyPI is a CUDA build; point PIP_EXTRA_INDEX_URL at a CPU wheel index for a small image.
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
COPY requirements.txt ./
RUN python -m pip install -r requirements.txt
COPY pyproject.toml README.md config.yaml ./
COPY proxy ./proxy
COPY guard ./guard
# proxy/cli/main.py imports bench's subcommand: without it `backtrack` itself fails to start.
COPY bench ./bench
COPY policies ./policies
RUN python -m pip install --no-deps .
EXPOSE 8080
USER nobody
# Healthy once /readyz answers 200: the guard is loaded and the upstream client is up (the guard takes a
# while to load on a small machine, hence the start period). Python, as the slim image has no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]
CMD ["backtrack", "serve", "--config", "/app/config.yaml", "--host", "0.0.0.0", "--port", "8080"]
