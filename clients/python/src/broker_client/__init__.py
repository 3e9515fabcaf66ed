"""Client side of the resource broker: generated broker.v1 stubs (``broker_client.v1``) and helpers."""
