"""The companion model worker: one local causal LM (plus embeddings) behind the OpenAI API."""
