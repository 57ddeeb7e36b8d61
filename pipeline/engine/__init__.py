"""The engine: runtime model directory -> tokenizer, batches, backend (see engine.engine)."""
