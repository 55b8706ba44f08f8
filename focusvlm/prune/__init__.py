"""LLM-side token removal (FastV): tokens leave the language model's sequence and cache after a layer."""
