"""The reference model: corpus, tokenizer and training code, and the committed F16 GGUF."""
