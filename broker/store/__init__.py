"""Persistence adapters: the desired-state store (``broker.store.sqlite`` owns aiosqlite)."""
