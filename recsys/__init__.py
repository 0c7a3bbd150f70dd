"""recsys: two-tower recommendation retrieval from raw logs to a gRPC answer."""

__version__ = "0.1.0"
