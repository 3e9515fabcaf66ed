"""Transports: the gRPC servicer and the /v1 HTTP gateway, both thin over ``broker.service``."""
