"""ESM-2 models: safe checkpoint loading (`loading`) and the per-residue forward with batching and windows (`embed`)."""
