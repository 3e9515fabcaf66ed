"""Generated gRPC stubs and messages of the broker.v1 API (do not edit; run scripts/gen_proto.py)."""
