"""The image tokenizer (MaskGIT-VQGAN): the model, its official weights, and training a small one."""
