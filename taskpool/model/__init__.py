"""The job model and the supervision policy: pure data, importing nothing of ours above it."""
