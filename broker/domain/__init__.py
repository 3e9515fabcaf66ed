"""Pure domain logic: no grpc, protobuf, kubernetes, sqlite or aiohttp imports (enforced by import-linter)."""
