"""Data: images and the demo's MNIST digits, token shards on disk, and the training batches."""
