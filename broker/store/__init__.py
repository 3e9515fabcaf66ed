"""Persistence: the store port and its adapters (``sqlite`` owns aiosqlite, ``postgres`` owns asyncpg)."""
