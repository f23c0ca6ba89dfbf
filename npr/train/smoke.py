"""Smoke/test-only rollout forcing with a learning signal (``rollout_forcing: structure-answer``).

``StructureForcer`` (npr.engine.forcing) makes a random model write a well-formed parallel
trace, but it always closes with the same ``\\boxed{0}``: every sample of a prompt then gets
the same accuracy reward, every PAPO advantage is 0 and so is every gradient. Here the trace
is the same forced structure, but the final box is the MODEL's choice between the problem's
answer and a wrong one (the answer with a ``1`` appended): at the first token where the two
candidates differ the logits are restricted to those two tokens and sampled, the rest of the
chosen candidate and EOS are forced. A random model picks each about half the time, so the
rewards of a group vary and the policy gradient is not zero; the choice is a sampled action
whose log-probability training moves, so the accuracy can actually be learned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from npr.engine import StructureForcer


def answer_candidates(answer: str) -> tuple[str, str]:
    """The right answer and a wrong one that shares its first characters (``answer + "1"``)."""
    return answer, f"{answer}1"


class AnswerChoiceForcer:
    """Logits processor: the smoke structure of ``StructureForcer(branch_tokens)`` without its
    fixed answer, then `` \\boxed{X}`` + EOS with X chosen by the model between the candidates
    of ``answers[prompt_index]`` (global prompt index -> answer string)."""

    def __init__(self, tokenizer, branch_tokens: Sequence[Sequence[int]], answers: Mapping[int, str]):
        self.structure = StructureForcer(tokenizer, branch_tokens=branch_tokens, answer=None)
        self.eos = tokenizer.eos_token_id
        self.endings: dict[int, tuple[list[int], list[int]]] = {}
        for index, answer in answers.items():
            right, wrong = (
                tokenizer.encode(f" \\boxed{{{a}}}", add_special_tokens=False) for a in answer_candidates(answer)
            )
            self.endings[int(index)] = (right, wrong)

    @staticmethod
    def _forced(logits: torch.Tensor, allowed: Sequence[int]) -> torch.Tensor:
        out = torch.full_like(logits, float("-inf"))
        out[list(allowed)] = logits[list(allowed)]
        return out

    def __call__(self, stream, logits: torch.Tensor) -> torch.Tensor:
        slots, skip = self.structure.script(stream)
        end = len(slots) - 1  # the structure's last slot is its EOS: the box goes there instead
        written = len(stream.tokens) - skip
        if stream.kind != "main" or written < end or slots[end] != self.eos:
            return self.structure(stream, logits)
        right, wrong = self.endings[stream.prompt_index]
        tail = stream.tokens[skip + end :]  # what this stream wrote of the box so far
        k = len(tail)
        for candidate in (right, wrong):
            if tail == candidate[:k] and k < len(candidate):
                other = wrong if candidate is right else right
                options = {candidate[k]}
                if other[:k] == tail and k < len(other):
                    options.add(other[k])  # still undecided: the model chooses here
                return self._forced(logits, sorted(options))
        return self._forced(logits, [self.eos])
