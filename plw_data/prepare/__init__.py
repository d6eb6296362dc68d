"""Raw rows to a prepared directory: sources -> formats -> encode (render, tokenize, mask) -> pack ->
shards, driven by `pipeline.prepare`; `merge`, `verify` and `inspect` work on the result."""
