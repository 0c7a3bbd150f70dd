"""What every stage shares and nothing of recsys is imported by: file names (schema), ID vocabularies (vocab),
atomic file writes (io), TOML config loading (config), ranking metrics (metrics) and log set-up (logs)."""
