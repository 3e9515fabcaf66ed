"""Resource broker: provisions databases, caches and topics in Kubernetes and reports drift."""
