"""The container image's HEALTHCHECK: exit 0 when this container's broker answers ``/readyz`` with 200.

It reads the variables ``broker serve`` reads, so it asks where the broker listens:
``BROKER_HTTP_ADDR`` (default ``0.0.0.0:8082``; a wildcard host is asked on loopback) and, when
``BROKER_TLS_CERT`` is set, HTTPS. It checks its own process on loopback, so it does not verify the
certificate; with ``BROKER_TLS_CLIENT_CA`` (client certificates required) it cannot connect, and the
orchestrator's own probe should be used instead. Standard library only: the image has no curl.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

# A wildcard listen address is asked on loopback.
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def readyz_url(environ: Mapping[str, str]) -> str:
    """The URL of ``/readyz`` for the address and TLS settings in ``environ``."""
    host, _, port = (environ.get("BROKER_HTTP_ADDR") or "0.0.0.0:8082").rpartition(":")
    host = host.strip("[]")
    host = WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if environ.get("BROKER_TLS_CERT") else "http"
    return f"{scheme}://{host}:{port}/readyz"


def main() -> int:
    url = readyz_url(os.environ)
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # its own process on loopback: liveness, not trust
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as response:  # noqa: S310 - http(s) only
            status = response.status
    except urllib.error.HTTPError as e:
        print(f"healthcheck: {url}: {e.code} {e.read(200).decode(errors='replace')}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"healthcheck: {url}: {e}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
