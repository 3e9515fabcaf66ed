# syntax=docker/dockerfile:1
# Multi-stage: build wheels with the full toolchain, run on a slim image as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY clients/python clients/python
COPY pyproject.toml README.md ./
COPY broker broker
RUN pip wheel --no-cache-dir --wheel-dir /wheels ./clients/python .

FROM python:3.11-slim
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin broker \
 && mkdir -p /var/lib/broker && chown 10001:10001 /var/lib/broker
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001:10001
ENV BROKER_LOG_FORMAT=json \
    BROKER_DATA_DIR=/var/lib/broker \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/broker"]
EXPOSE 50051 8082
HEALTHCHECK --interval=10s --timeout=3s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8082/healthz', timeout=2).status != 200)"
ENTRYPOINT ["broker"]
CMD ["serve", "--tokens", "/etc/broker/tokens.yaml"]
