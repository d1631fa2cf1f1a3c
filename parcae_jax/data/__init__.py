"""Data: tokenizers, corpus preparation to token shards, and the Grain input pipeline."""
