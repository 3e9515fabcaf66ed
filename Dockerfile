# syntax=docker/dockerfile:1
# The broker's image: a virtual environment built in one stage, copied onto the same base in the next,
# run as a non-root user on a read-only root filesystem (data on the /var/lib/broker volume).
#
#   docker build -t resource-broker:0.1.0 .          # on python:3.11-slim
#   ./dev.sh image                                   # podman/buildah; makes a Debian base when none can be pulled
#
# BASE is any Debian-like image with /bin/sh and apt. The default has Python 3.11 in /usr/local; a bare
# Debian bookworm (what ./dev.sh image makes with debootstrap when no registry is reachable) gets
# Debian's python3 (3.11) from apt in both stages when it lacks one.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
RUN if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/broker
WORKDIR /src
# Layers from the least to the most often changed: the locked dependencies (from pyproject.toml), the
# client distribution with the generated stubs, then the server package.
# The ca-certificates secret is optional: a CA bundle for pip where HTTPS goes through an intercepting
# proxy (./dev.sh image passes the host's). It is mounted for one command and never stored in a layer.
COPY pyproject.toml ./
RUN --mount=type=secret,id=ca-certificates \
    if [ -s /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi \
 && python3 -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if not d.startswith("resource-broker-client")))' > requirements.txt \
 && /opt/broker/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.txt
COPY clients/python clients/python
RUN --mount=type=secret,id=ca-certificates \
    if [ -s /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi \
 && /opt/broker/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps ./clients/python
COPY README.md ./
COPY broker broker
RUN --mount=type=secret,id=ca-certificates \
    if [ -s /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi \
 && /opt/broker/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps . \
 && /opt/broker/bin/pip check \
 && /opt/broker/bin/python3 -m pip uninstall -y -q pip setuptools

FROM ${BASE}
RUN if ! command -v python3 >/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --gid 10001 broker \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/broker --no-create-home --shell /usr/sbin/nologin broker \
 && mkdir -p /var/lib/broker /etc/broker \
 && chown 10001:10001 /var/lib/broker \
 && chmod 0700 /var/lib/broker
COPY --from=build /opt/broker /opt/broker
COPY scripts/image_healthcheck.py /opt/broker/healthcheck.py
USER 10001:10001
# The working directory is the data volume: with a read-only root filesystem, anything that needs a
# scratch file (Python's tempfile, SQLite's temporary files) falls back to the current directory
# when /tmp is not writable. Mount a tmpfs on /tmp to keep such files off the volume.
WORKDIR /var/lib/broker
ENV PATH=/opt/broker/bin:$PATH \
    BROKER_LOG_FORMAT=json \
    BROKER_DATA_DIR=/var/lib/broker \
    BROKER_GRPC_ADDR=0.0.0.0:50051 \
    BROKER_HTTP_ADDR=0.0.0.0:8082 \
    HOME=/var/lib/broker \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/broker"]
EXPOSE 50051 8082
# Readiness of this container's broker at BROKER_HTTP_ADDR (change the address by that variable, not
# by --http-addr, for the check to follow it). Standard library only: no curl in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python3", "/opt/broker/healthcheck.py"]
ENTRYPOINT ["broker"]
CMD ["serve", "--tokens", "/etc/broker/tokens.yaml"]
