"""Prompts: the NPR format instruction (kept here, in one place) and the chat encoding.

Every stage and the evaluation build prompt ids through ``encode_prompt``, so the chat
template is applied the same way everywhere. The instruction mentions the tags, which is
why parsing and masking start at the response, never at the prompt.

The instruction can be replaced by a file (``--system-prompt-file``, read by
``read_instruction_file``), e.g. the one NPR's released checkpoints were trained with, and
placed either as the system message (npr's layout) or after the problem in the user message
(``placement="user"``: ``problem + "\n\n" + instruction``, the layout of NPR's released code:
npr-beta/sampling/rejection_sampling.py, evals/evaluate.py, npr-rl/examples/data_preprocess/orz.py).
"""

from __future__ import annotations

from pathlib import Path

from npr.errors import NprError

NPR_INSTRUCTION = """\
Answer in the parallel reasoning format below and nothing else.

<guideline>
<plan>1: one short, self-contained plan</plan>
<plan>2: another plan that can run at the same time</plan>
</guideline>
<step>
1: carry out plan 1 alone, without using step 2
</step>
<step>
2: carry out plan 2 alone, without using step 1
</step>
<takeaway>
compare the steps and say what they show
</takeaway>

Rules: a <guideline> holds 1 to 5 <plan> tags; write exactly one <step> per <plan>, in the \
same order; each step must stand on its own, as if the other steps did not exist; the \
<takeaway> only compares and combines the steps. You may write further blocks of \
<guideline>, <step> and <takeaway>. After the last </takeaway>, give the final answer as \
\\boxed{answer}."""

STYLES = ("npr", "plain")
PLACEMENTS = ("system", "user")


class PromptError(NprError, ValueError):
    """An instruction file that cannot be used; the message names the flag and the file."""


def read_instruction_file(path: str | Path, flag: str = "--system-prompt-file") -> str:
    """The text of an instruction file, stripped of surrounding whitespace (as NPR's
    ``load_instruction`` does). Missing, unreadable, non-UTF-8 or empty files raise
    ``PromptError`` naming ``flag``."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(
            f"{flag} {path}: no such file; pass a text file holding the format instruction "
            "(e.g. the prompts/npr.txt of NPR's released code)"
        )
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"{flag} {path}: cannot be read as UTF-8 text ({e})") from e
    if not text:
        raise PromptError(f"{flag} {path}: the file is empty; it must hold the instruction text")
    return text


def build_messages(
    problem: str, style: str = "npr", instruction: str | None = None, placement: str = "system"
) -> list[dict[str, str]]:
    """Chat messages for one problem.

    ``npr`` adds the format instruction (``instruction``, default ``NPR_INSTRUCTION``) as the
    system message, or with ``placement="user"`` after the problem in the user message; ``plain``
    asks for a step-by-step answer in ``\\boxed{}`` (the base-model and sequential-RL baseline
    prompt) and takes no instruction.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown instruction placement {placement!r}; use one of {PLACEMENTS}")
    if style == "npr":
        text = NPR_INSTRUCTION if instruction is None else instruction
        if placement == "user":
            return [{"role": "user", "content": f"{problem.strip()}\n\n{text}"}]
        return [{"role": "system", "content": text}, {"role": "user", "content": problem}]
    if style == "plain":
        if instruction is not None:
            raise ValueError("the plain prompt style takes no instruction; use style npr with an instruction file")
        plain = "Think step by step and put the final answer in \\boxed{}."
        return [{"role": "user", "content": f"{problem}\n\n{plain}"}]
    raise ValueError(f"unknown prompt style {style!r}; use one of {STYLES}")


def prompt_text(
    tokenizer, problem: str, style: str = "npr", instruction: str | None = None, placement: str = "system"
) -> str:
    """The full prompt string after the chat template, ending where the assistant starts."""
    return tokenizer.apply_chat_template(
        build_messages(problem, style, instruction, placement), tokenize=False, add_generation_prompt=True
    )


def encode_prompt(
    tokenizer, problem: str, style: str = "npr", instruction: str | None = None, placement: str = "system"
) -> list[int]:
    """Prompt token ids (chat template applied, no extra BOS: the template has its own)."""
    if not problem or not problem.strip():
        raise ValueError("empty problem text: every prompt needs a question")
    return tokenizer.encode(prompt_text(tokenizer, problem, style, instruction, placement), add_special_tokens=False)
