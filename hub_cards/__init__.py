"""Model cards and publishing to Hub-style repositories."""
