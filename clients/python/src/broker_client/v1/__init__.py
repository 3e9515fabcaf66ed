"""Generated gRPC stubs and messages of the broker.v1 API, and its descriptor set with comments
(broker.binpb) for server reflection (do not edit; run scripts/gen_proto.py)."""
