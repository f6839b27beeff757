"""From-scratch path: tokenizer training, corpus packing, mini model configs."""
