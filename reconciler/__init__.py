"""ailayer: converge the LLM engine processes on a GPU server to one desired model."""

__version__ = "0.1.0"
