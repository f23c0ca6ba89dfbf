"""Optional dependencies: a feature outside the core install imports its package through
``require``, so a missing one is a one-line ``NprError`` naming the extra that installs it
(pyproject.toml's ``[project.optional-dependencies]``), not an ImportError traceback.

The core install (``pip install -e .``) runs training, sampling, evaluation and
``npr pipeline --preset tiny``; the extras add:

- ``serve``: ``npr serve`` (starlette, uvicorn, pydantic, anyio);
- ``gym``: reasoning-gym data (``rg:<task>`` specs) and its scorers;
- ``hub``: Hugging Face datasets (``hf:`` specs, the benchmarks' hub sources);
- ``trackers``: ``--report-to`` tensorboard, wandb, mlflow, trackio.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from npr.errors import NprError

# extra -> what it is for, as the error message says it
EXTRAS = {
    "serve": "npr serve",
    "gym": "reasoning-gym data (rg:<task> specs) and scoring",
    "hub": "reading datasets from the Hugging Face hub",
    "trackers": "experiment trackers (--report-to)",
}


class MissingExtraError(NprError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra."""


def install_hint(extra: str) -> str:
    return f"pip install 'npr[{extra}]' (from a checkout: pip install -e '.[{extra}]')"


def require(module: str, extra: str) -> ModuleType:
    """``importlib.import_module(module)``, or ``MissingExtraError`` naming ``extra`` when the package
    (or one it needs) is missing. Only a missing module is translated; any other import error propagates."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; one of {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise MissingExtraError(
            f"{EXTRAS[extra]} needs the package {e.name or module!r}, which is not installed: {install_hint(extra)}"
        ) from e
