"""Training RAR: the run configuration, the training loop, and the run folder it writes."""
