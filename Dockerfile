# One image for the API and the workers; the command picks the role (see docker-compose.yml).
# The CUDA build of torch comes from PyPI's default wheel for Linux x86_64; set TORCH_SPEC to pin another.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    SVFIT_DATA_DIR=/data

WORKDIR /app
RUN pip install "${TORCH_SPEC}"

# Dependencies first (better layer caching), then the source.
COPY pyproject.toml README.md ./
RUN mkdir -p api worker svfit_core svfit_cli dashboard migrations \
    && touch api/__init__.py worker/__init__.py svfit_core/__init__.py svfit_cli/__init__.py \
             dashboard/__init__.py migrations/__init__.py \
    && pip install ".[s3]" && pip uninstall -y svfit-service
COPY api ./api
COPY worker ./worker
COPY serving ./serving
COPY svfit_core ./svfit_core
COPY graders ./graders
COPY svfit_cli ./svfit_cli
COPY dashboard ./dashboard
COPY migrations ./migrations
COPY alembic.ini* ./
RUN pip install --no-deps .

RUN useradd --create-home --uid 1000 svfit && mkdir -p /data && chown svfit /data
USER svfit
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["svfit", "api", "--host", "0.0.0.0", "--port", "8000"]
