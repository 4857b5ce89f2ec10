"""DifferNet, the scorer: embedder, flow, patch memory, training, model files."""
