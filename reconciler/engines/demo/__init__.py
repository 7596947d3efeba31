"""Demo engines: stand-ins that look to the reconciler like vLLM and Ollama, with no GPU."""
