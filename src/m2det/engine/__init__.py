"""Training, evaluation and the loops around the network."""
