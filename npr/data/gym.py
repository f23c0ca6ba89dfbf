"""Procedural problems from reasoning-gym, generated offline from a spec string.

Spec: ``rg:<task>?size=N&seed=S&<config field>=<value>&…``, e.g.
``rg:chain_sum?size=200&seed=7&min_terms=2&max_terms=2``.

- ``size`` (default 100) and ``seed`` (default 0) go to ``reasoning_gym.create_dataset``; the
  same spec always gives the same problems.
- Other keys are fields of the task's config dataclass. Values become int, float or bool
  (``true``/``false``) when they parse as one, else stay strings.
- Alias: ``X=v`` where the config has ``min_X`` and ``max_X`` but no ``X`` sets both, so
  ``terms=2`` means ``min_terms=2&max_terms=2``.

Problem ids are ``<task>-s<seed>-<index>``; ``rg_entry`` keeps the whole entry so that
reasoning-gym's own scorer can grade the answer.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qsl, urlsplit

from npr.data.errors import DataError, UnknownSpecError
from npr.data.problems import Problem
from npr.extras import require

DEFAULT_SIZE = 100
DEFAULT_SEED = 0


def parse_value(text: str) -> int | float | bool | str:
    """``"3"`` → 3, ``"0.5"`` → 0.5, ``"true"``/``"false"`` → bool, anything else unchanged."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_rg_spec(spec: str) -> tuple[str, dict[str, int | float | bool | str]]:
    """``rg:task?k=v&…`` → (task, {k: parsed v}), keeping the keys as written (no validation)."""
    body = spec.strip().removeprefix("rg:")
    parts = urlsplit(body)
    task = parts.path.strip()
    if not task or parts.scheme or parts.netloc:
        raise DataError(
            f"{spec!r}: expected rg:<task>?size=N&seed=S&<param>=<value>…, e.g. rg:chain_sum?size=200&seed=7"
        )
    params: dict[str, int | float | bool | str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as e:
        raise DataError(f"{spec!r}: bad query {parts.query!r} ({e}); write key=value pairs joined by &") from e
    for key, value in pairs:
        if key in params:
            raise DataError(f"{spec!r}: parameter {key!r} given twice")
        if value == "":
            raise DataError(f"{spec!r}: parameter {key!r} has no value")
        params[key] = parse_value(value)
    return task, params


def _config_fields(task: str) -> list[str]:
    DATASETS = require("reasoning_gym.factory", "gym").DATASETS  # noqa: N806 (reasoning-gym's name)

    if task not in DATASETS:
        raise UnknownSpecError(f"unknown reasoning-gym task {task!r}; valid tasks: {', '.join(sorted(DATASETS))}")
    return [f.name for f in dataclasses.fields(DATASETS[task][1])]


def resolve_params(task: str, params: dict, spec: str) -> dict:
    """Config kwargs for ``task``: size/seed defaults, the min_/max_ alias, unknown keys refused."""
    fields = _config_fields(task)
    kwargs = {"size": DEFAULT_SIZE, "seed": DEFAULT_SEED}
    for key, value in params.items():
        if key in fields:
            kwargs[key] = value
        elif f"min_{key}" in fields and f"max_{key}" in fields:
            kwargs[f"min_{key}"] = kwargs[f"max_{key}"] = value
        else:
            valid = [f for f in fields if f not in ("size", "seed")]
            aliases = sorted(f[4:] for f in fields if f.startswith("min_") and f"max_{f[4:]}" in fields)
            raise UnknownSpecError(
                f"{spec!r}: {task} has no parameter {key!r}; valid: size, seed, {', '.join(valid)}"
                + (f" (aliases setting min_X and max_X together: {', '.join(aliases)})" if aliases else "")
            )
    for key in ("size", "seed"):
        if (
            not isinstance(kwargs[key], int)
            or isinstance(kwargs[key], bool)
            or kwargs[key] < (1 if key == "size" else 0)
        ):
            raise DataError(
                f"{spec!r}: {key} must be a {'positive' if key == 'size' else 'non-negative'} integer, "
                f"got {kwargs[key]!r}"
            )
    return kwargs


def load_rg_spec(spec: str, limit: int | None = None) -> list[Problem]:
    """The problems of a reasoning-gym spec (the first ``limit`` only, when given)."""
    reasoning_gym = require("reasoning_gym", "gym")
    spec = spec.strip()
    task, params = parse_rg_spec(spec)
    kwargs = resolve_params(task, params, spec)
    try:
        dataset = reasoning_gym.create_dataset(task, **kwargs)
    except (AssertionError, ValueError, TypeError) as e:  # the config's own validation
        raise DataError(f"{spec!r}: reasoning-gym refused the config {kwargs}: {e or type(e).__name__}") from e
    count = kwargs["size"] if limit is None else min(limit, kwargs["size"])
    seed = kwargs["seed"]
    problems = []
    for i in range(count):
        entry = dataset[i]
        problems.append(
            Problem(
                id=f"{task}-s{seed}-{i}",
                problem=entry["question"],
                answer=str(entry["answer"]),
                source=spec,
                rg_entry=entry,
                location=f"{spec} #{i}",
            )
        )
    return problems
