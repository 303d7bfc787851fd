"""Training entry points (pretraining and fine-tuning)."""
