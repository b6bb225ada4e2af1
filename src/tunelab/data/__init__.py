"""Data: read files, detect their format, validate, render to token ids with a loss mask, pack."""
