"""The gRPC serving stack: ``create_server(address, settings) -> (server, port)``.

This package's names below are its whole surface for `recsys serve` and `recsys demo` (the only parts of recsys
that import it; recsys' library packages never do).
"""

from server.app import RecommenderServer, create_server, serve_until_signal
from server.settings import ServeSettings, load_settings

__all__ = ["RecommenderServer", "ServeSettings", "create_server", "load_settings", "serve_until_signal"]
