"""npr: Native Parallel Reasoner (arXiv 2512.07461) in PyTorch over transformers."""

__version__ = "0.1.0"
