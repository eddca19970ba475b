# Omnigate gateway with its embedded store. Data (the store, its log) lives in /data.
#   docker build -t omnigate .
#   docker run -p 8080:8080 -v omnigate-data:/data omnigate
# To use your own MongoDB (a replica set), pass -e OMNIGATE_MONGODB_URI=mongodb://...
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
COPY connectors ./connectors
COPY flows ./flows
COPY examples ./examples
RUN pip install --no-cache-dir '.[embedded]' \
    && useradd --uid 10001 --create-home omnigate \
    && mkdir /data && chown omnigate /data

USER omnigate
ENV OMNIGATE_HOST=0.0.0.0 \
    OMNIGATE_PORT=8080 \
    OMNIGATE_DATA_DIR=/data \
    OMNIGATE_FLOWS_DIR=/app/examples/flows \
    OMNIGATE_ACTIONS_PACKAGE=examples.actions \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"
STOPSIGNAL SIGTERM
CMD ["omnigate", "serve"]
