"""Data preparation: raw text to curated, tokenized, packed training data.

Entry point: ``python -m hybrid_mamba.data_scripts.prepare --recipe RECIPE --output DATA``; the output format and
the stages are described in ``data_scripts/README.md``.
"""
