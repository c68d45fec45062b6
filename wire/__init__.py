"""OpenAI wire pieces shared by the gateway and the worker: errors, SSE framing, response shapes."""
