"""The embedded default job (`make demo`)."""
