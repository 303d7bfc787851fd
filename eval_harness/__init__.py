"""Evaluation and benchmarks of hybrid_mamba models."""
