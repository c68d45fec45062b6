"""The LLM gateway: one OpenAI-compatible front door in front of many model backends."""
