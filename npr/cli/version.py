"""``npr version``."""

from __future__ import annotations

import platform


def add_parser(sub, name: str, help_text: str):
    return sub.add_parser(name, help=help_text, description=help_text)


def run(args) -> int:
    import torch
    import transformers

    import npr

    print(f"npr {npr.__version__}")
    print(f"torch {torch.__version__} (cuda: {torch.cuda.is_available()})")
    print(f"transformers {transformers.__version__}")
    print(f"python {platform.python_version()}")
    return 0
