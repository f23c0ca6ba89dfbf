"""Prompts: the NPR format instruction (kept here, in one place) and the chat encoding.

Every stage and the evaluation build prompt ids through ``encode_prompt``, so the chat
template is applied the same way everywhere. The instruction mentions the tags, which is
why parsing and masking start at the response, never at the prompt.
"""

from __future__ import annotations

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


def build_messages(problem: str, style: str = "npr") -> list[dict[str, str]]:
    """Chat messages for one problem: ``npr`` adds the format instruction, ``plain`` asks for a
    step-by-step answer in ``\\boxed{}`` (the base-model and sequential-RL baseline prompt)."""
    if style == "npr":
        return [{"role": "system", "content": NPR_INSTRUCTION}, {"role": "user", "content": problem}]
    if style == "plain":
        return [{"role": "user", "content": f"{problem}\n\nThink step by step and put the final answer in \\boxed{{}}."}]
    raise ValueError(f"unknown prompt style {style!r}; use one of {STYLES}")


def prompt_text(tokenizer, problem: str, style: str = "npr") -> str:
    """The full prompt string after the chat template, ending where the assistant starts."""
    return tokenizer.apply_chat_template(build_messages(problem, style), tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, problem: str, style: str = "npr") -> list[int]:
    """Prompt token ids (chat template applied, no extra BOS: the template has its own)."""
    if not problem or not problem.strip():
        raise ValueError("empty problem text: every prompt needs a question")
    return tokenizer.encode(prompt_text(tokenizer, problem, style), add_special_tokens=False)
