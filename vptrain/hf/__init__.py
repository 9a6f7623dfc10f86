"""Hugging Face checkpoints in and out: `model.init_from=hf:DIR` (import) and `vptrain export-hf`."""
