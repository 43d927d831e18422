"""Local stand-ins for what lives across the network (PromptLayer's API, an LLM), on 127.0.0.1."""
