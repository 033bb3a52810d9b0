"""Static-shape primitives every layer above builds on: token sets, the LLM's token
stream, sharding. Imports no model and no method."""
