"""The edges: Hugging Face and original-layout checkpoints, tokenizers, chat templates,
image preprocessing and length buckets."""
