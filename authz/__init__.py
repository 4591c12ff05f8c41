"""Authorization policy: model, parser and pure evaluation. No I/O of any kind."""
