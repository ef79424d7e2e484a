"""The tools: the client library, `tail` and `bench`; they use only the config and the client."""
