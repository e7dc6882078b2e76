"""One module per CLI command, each with `run(cfg)`; the command's config is conf/<command>.yaml."""
