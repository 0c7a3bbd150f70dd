"""One module per `recsys` subcommand (see recsys.cli)."""
