"""Text inputs: token ids and frames checked, streamed text held back where it may still
change, subword tokenizers."""
