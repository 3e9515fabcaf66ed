"""Example manager services built on the client library (need the ``example`` extra)."""
