"""Hugging Face interoperability: export, import."""
