"""Reading and writing files: weights, checkpoints, the official format."""
