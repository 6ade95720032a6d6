"""Export upstream weights (or random weights of the same architectures) into a Triton model repository."""
