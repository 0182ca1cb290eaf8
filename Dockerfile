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
COPY policies ./policies
RUN python -m pip install --no-deps .
EXPOSE 8080
USER nobody
CMD ["backtrack", "serve", "--config", "/app/config.yaml", "--host", "0.0.0.0", "--port", "8080"]
