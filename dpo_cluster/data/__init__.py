"""The preference-data pipeline: formats, tokenization and the Ray Data pipeline."""
