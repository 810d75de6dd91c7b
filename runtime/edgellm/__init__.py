"""edgellm: a lean LLM runtime for NVIDIA edge appliances."""

__version__ = "0.1.0"
