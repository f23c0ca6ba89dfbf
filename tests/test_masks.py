"""npr.masks: the tree attention mask and position ids, against a hand example and a slow reference."""

from __future__ import annotations

import random

import pytest
import torch

from npr.masks import (
    StructureError,
    attention_bias,
    batch_inputs,
    has_complete_blocks,
    parallel_mask_and_positions,
    scan_blocks,
)
from npr.schema import TAGS

TAG_IDS = {tag: 100 + i for i, tag in enumerate(TAGS)}
G, G_, P, P_, S, S_, T, T_ = (TAG_IDS[t] for t in TAGS)


def test_hand_written_20_token_example():
    #        0  1  2  3  4  5   6  7  8   9   10 11 12  13 14 15 16  17 18 19
    ids = [7, 8, G, P, 1, P_, P, 2, P_, G_, S, 3, S_, S, 4, 4, S_, T, 5, T_]
    allowed, positions = parallel_mask_and_positions(ids, TAG_IDS, response_start=2)
    expected_rows = [
        "1",
        "11",
        "111",
        "1111",
        "11111",
        "111111",
        "1111111",
        "11111111",
        "111111111",
        "1111111111",
        "11111111111",  # 10 <step> (branch 1)
        "111111111111",
        "1111111111111",
        "11111111110001",  # 13 <step> (branch 2) cannot see 10..12
        "111111111100011",
        "1111111111000111",
        "11111111110001111",
        "111111111111111111",  # 17 <takeaway> sees both branches
        "1111111111111111111",
        "11111111111111111111",
    ]
    expected = torch.tensor([[c == "1" for c in row.ljust(20, "0")] for row in expected_rows])
    assert torch.equal(allowed, expected)
    assert positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 10, 11, 12, 13, 14, 15, 16]


def test_separators_after_step_belong_to_the_branch():
    # </guideline> \n | <step> a </step> \n | <step> b b </step> \n | <takeaway>
    ids = [G, P, 1, P_, P, 1, P_, G_, 9, S, 2, S_, 9, S, 3, 3, S_, 9, T, 4, T_]
    allowed, positions = parallel_mask_and_positions(ids, TAG_IDS)
    (block,) = scan_blocks(ids, TAG_IDS)
    assert block.first_step == 9 and block.steps == ((9, 13), (13, 18)) and block.takeaway == 18
    assert not allowed[13:18, 9:13].any()  # branch 2 never sees branch 1, its separator included
    assert positions[8].item() == 8  # the separator after </guideline> is shared
    assert positions[9:13].tolist() == [9, 10, 11, 12] and positions[13:18].tolist() == [9, 10, 11, 12, 13]
    assert positions[18].item() == 14  # takeaway: last shared (8) + longest branch (5) + 1


def test_no_block_is_causal_with_arange_positions():
    ids = [1, 2, 3, 4, 5]
    allowed, positions = parallel_mask_and_positions(ids, TAG_IDS)
    assert torch.equal(allowed, torch.ones(5, 5, dtype=torch.bool).tril())
    assert positions.tolist() == [0, 1, 2, 3, 4]


def test_prompt_tags_are_plain_context():
    prompt = [S, 1, S_, G]  # an instruction that mentions tags
    response = [G, P, 1, P_, G_, S, 2, S_, T, 3, T_, 5]
    allowed, positions = parallel_mask_and_positions(prompt + response, TAG_IDS, response_start=len(prompt))
    assert positions[:4].tolist() == [0, 1, 2, 3]
    with pytest.raises(StructureError):
        parallel_mask_and_positions(prompt + response, TAG_IDS, response_start=0)


@pytest.mark.parametrize(
    "ids, message",
    [
        ([G, G_], "no <plan>"),
        ([G, P, 1, P_, G_, S, 2, S_, S, 3, S_, T, T_], "<step> 2 for a guideline with 1 plan"),
        ([G, P, 1, P_, P, 2, P_, G_, S, 2, S_, T, T_], "<takeaway> after 1 step"),
        ([G, P, 1, P_, G_, S, 2, S_, T, 3], "ends inside takeaway"),
        ([G, P, 1, P_, G_, S, 2], "ends inside step"),
        ([S_], "</step> is not allowed inside text"),
        ([G, P, G, P_], "<guideline> is not allowed inside plan"),
        ([G, P, 1, P_, G_, S, G, S_], "token 6: <guideline> is not allowed inside step"),
    ],
)
def test_malformed_sequences_raise(ids, message):
    with pytest.raises(StructureError, match=message):
        parallel_mask_and_positions(ids, TAG_IDS)


# ----------------------------------------------------------------------------- slow reference


def reference_mask_and_positions(ids, tag_ids, response_start=0):
    """Straight from the definition: i sees j iff j <= i and they are not in different steps of one
    block; a token's position is one past the largest position it can see."""
    tags = {v: k for k, v in tag_ids.items()}
    n = len(ids)
    branch = [None] * n  # (block, step) for tokens in a steps region
    block_no, step_no, in_region = -1, -1, False
    for i in range(response_start, n):
        tag = tags.get(ids[i])
        if tag == "<guideline>":
            block_no, step_no = block_no + 1, -1
        if tag == "<step>":
            in_region, step_no = True, step_no + 1
        if tag == "<takeaway>":
            in_region = False
        if in_region:
            branch[i] = (block_no, step_no)
    allowed = [[False] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            bi, bj = branch[i], branch[j]
            allowed[i][j] = not (bi and bj and bi[0] == bj[0] and bi[1] != bj[1])
    positions = []
    for i in range(n):
        positions.append(0 if i == 0 else 1 + max(positions[j] for j in range(i) if allowed[i][j]))
    return torch.tensor(allowed), torch.tensor(positions)


def random_trace(rng: random.Random, with_prompt: bool = True) -> tuple[list[int], int]:
    """A random well-formed token sequence: prompt (may contain tags), blocks, final text."""
    text = lambda lo, hi: [rng.randrange(1, 50) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    prompt = [rng.choice([*TAG_IDS.values(), *range(1, 50)]) for _ in range(rng.randint(0, 6))] if with_prompt else []
    response = text(0, 3)
    for _ in range(rng.randint(0, 3)):
        k = rng.randint(1, 5)
        response += [G] + sum(([P, *text(1, 3), P_] + text(0, 1) for _ in range(k)), []) + [G_] + text(0, 2)
        for _ in range(k):
            response += [S, *text(0, 6), S_, *text(0, 2)]
        response += [T, *text(0, 4), T_, *text(0, 2)]
    response += text(0, 4)
    return prompt + response, len(prompt)


@pytest.mark.parametrize("seed", range(60))
def test_matches_slow_reference(seed):
    ids, start = random_trace(random.Random(seed))
    allowed, positions = parallel_mask_and_positions(torch.tensor(ids), TAG_IDS, response_start=start)
    ref_allowed, ref_positions = reference_mask_and_positions(ids, TAG_IDS, start)
    assert torch.equal(allowed, ref_allowed)
    assert torch.equal(positions, ref_positions)


# ----------------------------------------------------------------------------- batching


def test_attention_bias_values():
    allowed = torch.tensor([[True, False], [True, True]])
    bias = attention_bias(allowed, torch.bfloat16)
    assert bias.dtype == torch.bfloat16
    assert bias[0, 0] == 0 and bias[1, 0] == 0 and bias[1, 1] == 0
    assert bias[0, 1] == torch.finfo(torch.bfloat16).min


def test_batch_inputs_folds_padding():
    a = [G, P, 1, P_, P, 2, P_, G_, S, 2, S_, S, 3, S_, T, 4, T_]
    b = [1, 2, 3]
    seqs = [(torch.tensor(x), *parallel_mask_and_positions(x, TAG_IDS)) for x in (a, b)]
    batch = batch_inputs(seqs, pad_token_id=0, dtype=torch.float32)
    assert batch["input_ids"].shape == (2, len(a))
    assert batch["attention_mask"].shape == (2, 1, len(a), len(a))
    mask = batch["attention_mask"][1, 0] == 0
    assert mask[:3, :3].equal(torch.ones(3, 3, dtype=torch.bool).tril())
    assert not mask[:3, 3:].any()  # real tokens never see padding
    assert mask[5].nonzero().flatten().tolist() == [5]  # a pad row sees only itself (no empty softmax row)
    assert batch["padding_mask"].sum(1).tolist() == [len(a), 3]
    assert torch.equal(batch["attention_mask"][0, 0] == 0, seqs[0][1])


def test_has_complete_blocks():
    prompt, block = [7, 8], [G, P, 1, P_, G_, S, 2, S_, T, 3, T_, 5]
    assert has_complete_blocks(prompt, block, TAG_IDS) and has_complete_blocks(prompt, [5, 6], TAG_IDS)
    assert not has_complete_blocks(prompt, block[:7], TAG_IDS)  # cut inside the step
    assert not has_complete_blocks(prompt, [G, P, 1, G_], TAG_IDS)  # </guideline> inside a plan
    assert has_complete_blocks([G, P], [5], TAG_IDS)  # tags in the prompt are not scanned
