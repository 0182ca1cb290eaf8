"""Wire dialects: sans-IO decoders (bytes -> events) and encoders (outputs -> bytes)."""
