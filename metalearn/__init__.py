"""metalearn: meta-learning for PyTorch."""
