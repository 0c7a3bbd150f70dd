"""The gRPC serving stack: ``create_server(address, settings) -> (server, port)``."""

from server.app import RecommenderServer, create_server, serve_until_signal
from server.settings import ServeSettings, load_settings

__all__ = ["RecommenderServer", "ServeSettings", "create_server", "load_settings", "serve_until_signal"]
