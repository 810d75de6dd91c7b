"""Engines: build INT4-AWQ engines from Hugging Face checkpoints and run them.

This package must import and run with only torch, safetensors and a tokenizer library:
no gRPC, no systemd, no signing.
"""
