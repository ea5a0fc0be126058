"""models: the Flax model zoo with a paged KV cache (OPT, Llama family)."""
