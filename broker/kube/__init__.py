"""The Kubernetes adapter: the only package that imports kubernetes-asyncio (enforced by import-linter)."""
