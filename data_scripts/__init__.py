"""Data preparation: raw text to curated, tokenized, packed training data."""
