"""Training of learned sparse retrievers: multi-process helpers and training loops."""
