"""HTTP handlers: the OpenAI API surface and the operator endpoints."""
