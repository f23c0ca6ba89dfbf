"""Final-answer extraction: the last ``\\boxed{…}`` whose braces balance."""

from __future__ import annotations

_BOXED = "\\boxed{"


def find_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` in ``text`` with balanced braces, or None.

    An unbalanced (e.g. truncated) last box is skipped in favour of the one before it.
    """
    idx = text.rfind(_BOXED)
    while idx >= 0:
        depth, i = 1, idx + len(_BOXED)
        while i < len(text):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[idx + len(_BOXED) : i]
            i += 1
        idx = text.rfind(_BOXED, 0, idx)
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the last balanced ``\\boxed{}``, stripped."""
    found = find_boxed(text)
    return None if found is None else found.strip()
