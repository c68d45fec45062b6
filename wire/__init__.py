"""OpenAI wire pieces shared by the gateway and the worker: the error envelope and SSE framing."""
