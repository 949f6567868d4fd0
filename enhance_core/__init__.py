"""The methods of the pack, in plain torch: one module per method, one adapter per model family."""
