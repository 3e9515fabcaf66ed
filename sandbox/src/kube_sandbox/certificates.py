"""A throwaway certificate authority and server certificate for serving the sandbox over HTTPS.

kubectl (client-go's kubeconfig loader) sends a user's bearer token only over TLS: against a
plain-HTTP server every context is anonymous, and the sandbox could not tell one user from another.
With ``Sandbox(tls=True)`` it serves HTTPS with a certificate issued here at start-up, valid for
the loopback names, and writes the CA into the kubeconfig (``certificate-authority-data``). This
module is the only user of ``trustme``.
"""

from __future__ import annotations

import dataclasses
import ssl

import trustme


@dataclasses.dataclass(frozen=True)
class ServerCertificate:
    """A CA and a server certificate it issued."""

    ca_pem: bytes
    _ca: trustme.CA = dataclasses.field(repr=False, compare=False)
    _leaf: trustme.LeafCert = dataclasses.field(repr=False, compare=False)

    def server_context(self) -> ssl.SSLContext:
        """The TLS context the API server listens with."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._leaf.configure_cert(context)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A TLS context that trusts the sandbox (for in-process HTTP clients)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self._ca.configure_trust(context)
        return context


def issue(hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")) -> ServerCertificate:
    """A fresh CA and a certificate for ``hosts`` (a fraction of a second: EC keys)."""
    ca = trustme.CA(organization_name="kube-sandbox")
    leaf = ca.issue_cert(*hosts)
    return ServerCertificate(ca_pem=ca.cert_pem.bytes(), _ca=ca, _leaf=leaf)
