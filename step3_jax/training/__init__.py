"""Training and the shipped demo model: the pure training step, the byte-level corpus, and where
the demo checkpoint lives."""
