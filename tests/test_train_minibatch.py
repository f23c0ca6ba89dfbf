"""Several optimizer steps per rollout batch (mini_batch_size, ppo_epochs) and log-probs at the
rollout temperature. Tiny random Llama built locally, fp32, one process.

The contracts: the old log-probs are computed once, before the first update, in the same
micro-batches as the update (so the first mini-batch's ratio is exactly 1 and its update is
today's single on-policy step); from the second mini-batch on DAPO's ratio moves off 1 and its
clip binds; the trainer's temperature-1 log-probs are the engine's, and at T != 1 the loss
uses log_softmax(logits / T).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from npr.algos import get_policy_loss
from npr.train.logprobs import causal_sequence, response_logprobs
from npr.train.rl import combine_step_metrics, mini_batch_parts
from npr.train.session import make_accelerator
from npr.train.update import PolicyBatch, old_policy_logprobs, optimizer_step, policy_backward


@pytest.fixture()
def llama():
    from npr.models import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("tiny-random-llama")
    return model.train(), tok


def _batch(tok, advantage: float, response: str = "4") -> PolicyBatch:
    """One response (by default one token, so its ratio is one number); two such batches of
    the same text make an update on the first move the ratio of the second."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    seq = causal_sequence(enc("Q: 2+2?\n"), enc(response))
    n = seq.response_length
    return PolicyBatch(
        [seq], [torch.ones(n, dtype=torch.bool)], torch.tensor([advantage]), [torch.full((n,), float("nan"))]
    )


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_mini_batch_parts_deal_the_global_order_in_turn():
    """M = ceil(groups / mini_batch_size) steps; the j-th rollout in global (group) order goes to
    step j mod M, so each step takes a share of every rank's rollouts."""
    acc = SimpleNamespace(num_processes=1, process_index=0)
    rollouts = [SimpleNamespace(group=g) for g in (3, 3, 5, 5, 6, 8, 8)]  # 4 groups
    assert mini_batch_parts(acc, rollouts, None) == [[0, 1, 2, 3, 4, 5, 6]]
    assert mini_batch_parts(acc, rollouts, 4) == [[0, 1, 2, 3, 4, 5, 6]]  # whole batch: one step
    assert mini_batch_parts(acc, rollouts, 2) == [[0, 2, 4, 6], [1, 3, 5]]
    assert mini_batch_parts(acc, rollouts, 3) == [[0, 2, 4, 6], [1, 3, 5]]
    assert mini_batch_parts(acc, rollouts, 1) == [[0, 4], [1, 5], [2, 6], [3]]
    assert mini_batch_parts(acc, [], 2) == [[]]
    # a refill round's groups (larger ids) listed before an earlier round's are dealt in id order
    late_first = [SimpleNamespace(group=g) for g in (40, 40, 3, 3, 3)]  # id order: 2 3 4 0 1
    assert mini_batch_parts(acc, late_first, 1) == [[1, 2, 4], [0, 3]]


def test_old_logprobs_of_the_current_policy_give_todays_single_step(llama):
    """mini_batch_size = the whole batch: computing the old log-probs first (exactly the ones
    the update recomputes) changes neither the loss nor the gradient, and the ratio is 1."""
    model, tok = llama
    acc = make_accelerator()
    loss_fn = get_policy_loss("dapo", clip_low=0.2, clip_high=0.28)
    batch = _batch(tok, 1.0, "It is 4, so \\boxed{4}.")
    results = []
    for old in (None, old_policy_logprobs(acc, model, batch, tok.pad_token_id, 1)):
        model.zero_grad()
        batch.old_logprobs = old
        metrics = policy_backward(acc, model, batch, loss_fn, "token-mean", tok.pad_token_id, 1)
        results.append((metrics, _grads(model)))
    (m0, g0), (m1, g1) = results
    assert m0["loss"] == m1["loss"] == -1.0  # -A·r with r = 1 on every token
    assert m1["ratio_max"] == m1["ratio_min"] == 1.0 and m1["clip_fraction"] == 0.0
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


def test_second_mini_batch_ratio_moves_and_the_clip_binds(llama):
    """Two mini-batches of the same one-token response with A = +1: the first SGD step (lr 0.01
    raises the token's probability ~3x on this random model) makes the second mini-batch's
    ratio r > 1 + clip_high, so max(-A·r, -A·clip(r)) = -A·(1 + clip_high) = -1.28, a
    constant: DAPO's clip-higher is active and the token carries no gradient."""
    model, tok = llama
    acc = make_accelerator()
    loss_fn = get_policy_loss("dapo", clip_low=0.2, clip_high=0.28)
    first, second = _batch(tok, 1.0), _batch(tok, 1.0)
    for batch in (first, second):  # once per rollout batch, before any update
        batch.old_logprobs = old_policy_logprobs(acc, model, batch, tok.pad_token_id, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    steps = []
    for batch in (first, second):
        metrics = policy_backward(acc, model, batch, loss_fn, "token-mean", tok.pad_token_id, 1)
        grads = _grads(model)
        metrics.update(optimizer_step(acc, model, optimizer, scheduler, 0.0, advance_schedule=False))
        steps.append((metrics, grads))
    (m1, _), (m2, g2) = steps
    assert m1["ratio_max"] == m1["ratio_min"] == 1.0 and m1["clip_fraction"] == 0.0
    assert m2["ratio_min"] > 1.28 and m2["ratio_mean"] > 1.28
    assert m2["clip_fraction"] == m2["clip_fraction_high"] == 1.0 and m2["clip_fraction_low"] == 0.0
    assert m2["loss"] == pytest.approx(-1.28)
    assert all(float(g.abs().max()) == 0.0 for g in g2.values())
    assert scheduler.last_epoch == 0  # mini-batch steps leave the schedule to the rollout step


def test_negative_advantage_clips_low(llama):
    """A = -1: the first step lowers the token's probability (~0.3x); below 1 - clip_low the
    clip binds on the low side: loss = -A·(1 - clip_low) = 0.8."""
    model, tok = llama
    acc = make_accelerator()
    loss_fn = get_policy_loss("dapo", clip_low=0.2, clip_high=0.28)
    first, second = _batch(tok, -1.0), _batch(tok, -1.0)
    for batch in (first, second):
        batch.old_logprobs = old_policy_logprobs(acc, model, batch, tok.pad_token_id, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    policy_backward(acc, model, first, loss_fn, "token-mean", tok.pad_token_id, 1)
    optimizer.step()
    optimizer.zero_grad()
    metrics = policy_backward(acc, model, second, loss_fn, "token-mean", tok.pad_token_id, 1)
    assert metrics["ratio_max"] < 0.8 and metrics["loss"] == pytest.approx(0.8)
    assert metrics["clip_fraction_low"] == 1.0 and metrics["clip_fraction_high"] == 0.0


def test_combine_step_metrics_weights_by_loss_units():
    updates = [
        dict(loss=1.0, clip_fraction=0.0, loss_units=10.0, ratio_max=1.0, ratio_min=1.0, grad_norm=2.0, lr=0.1),
        dict(loss=-2.0, clip_fraction=0.5, loss_units=30.0, ratio_max=1.5, ratio_min=0.7, grad_norm=4.0, lr=0.1),
    ]
    out = combine_step_metrics(updates)
    assert out["loss"] == pytest.approx((10 - 60) / 40) and out["clip_fraction"] == pytest.approx(15 / 40)
    assert (out["ratio_max"], out["ratio_min"], out["grad_norm"], out["lr"]) == (1.5, 0.7, 3.0, 0.1)
    assert out["optimizer_steps"] == 2 and out["loss_units"] == 40


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_trainer_logprobs_agree_with_the_engine_at_temperature(llama, temperature):
    """Rollouts sampled at T != 1: the engine reports the model's own (temperature-1) log-probs;
    the trainer's untempered log-probs equal them, and the log-probs the loss uses are
    log_softmax(logits / T), the sampling distribution (NPR's code: logits.div_(temperature))."""
    from npr.engine import Engine, EngineConfig, SamplingParams

    model, tok = llama
    model.eval()
    prompt = tok.encode("Q: what is 2+2?\n", add_special_tokens=False)
    engine = Engine(model, tok, EngineConfig(mode="plain", kv_cache_tokens=4096, max_num_seqs=4))
    engine.submit([prompt], SamplingParams(max_new_tokens=24, temperature=temperature, n=2, seed=3))
    results = []
    while engine.scheduler.has_work():
        results += engine.step().finished
    for r in results:
        seq = causal_sequence(r.prompt_ids, r.token_ids)
        with torch.no_grad():
            tempered, mask, plain = response_logprobs(
                model, [seq], tok.pad_token_id, temperature=temperature, untempered=True
            )
            logits = model(input_ids=seq.input_ids[None]).logits[0, seq.response_start - 1 : -1].float()  # [T, V]
        target = torch.tensor(r.token_ids)[:, None]
        assert torch.allclose(plain[0], torch.tensor(r.logprobs), atol=1e-4)  # the engine's rule: T = 1
        by_hand = (logits / temperature).log_softmax(-1).gather(-1, target)[:, 0]  # [T]
        assert torch.allclose(tempered[0], by_hand, atol=1e-5)
        assert not torch.allclose(tempered[0], plain[0], atol=1e-3)  # the temperature matters
    model.train()


# ---- Stage 1 end to end (smoke preset: 4 prompts x 4 forced parallel samples, 3 steps) ----


def _stage1(out, *flags: str) -> list[dict]:
    from npr.cli.main import main
    from npr.train.tracking import read_metrics

    assert main(["train", "stage1", "--preset", "smoke", "--out", str(out), "--quiet", *flags]) == 0
    return read_metrics(out / "metrics.jsonl")


def _weights(run):
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def test_stage1_whole_batch_mini_batch_equals_one_step_and_small_ones_step_per_group(tmp_path):
    one = _stage1(tmp_path / "none")
    whole = _stage1(tmp_path / "whole", "--mini-batch-size", "4")
    a, b = _weights(tmp_path / "none"), _weights(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)  # mini_batch_size = the batch: exactly today's step
    assert [m["loss"] for m in one] == [m["loss"] for m in whole]
    per_group = _stage1(tmp_path / "per-group", "--mini-batch-size", "1")
    for m in per_group:
        assert m["optimizer_steps"] == m["kept_groups"] >= 1
    moved = [m for m in per_group if m["optimizer_steps"] > 1]
    assert moved and all(m["ratio_max"] > 1.0 or m["ratio_min"] < 1.0 for m in moved)  # old log-probs are old
    c = _weights(tmp_path / "per-group")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_stage1_refill_keeps_the_target_number_of_groups(tmp_path):
    """max_gen_batches 0: each step draws rounds of 4 prompts until 4 groups pass dynamic
    sampling (trimmed to 4); every round's rollouts are counted and logged."""
    import json

    metrics = _stage1(tmp_path / "refill", "--max-gen-batches", "0")
    assert all(m["kept_groups"] == 4 for m in metrics)
    assert any(m["gen_rounds"] > 1 for m in metrics)  # the smoke preset keeps ~3 of 4 groups a round
    assert all(m["rollouts"] == 16 * m["gen_rounds"] for m in metrics)
    lines = (tmp_path / "refill" / "rollouts.jsonl").read_text().splitlines()
    assert len(lines) == 16 * sum(m["gen_rounds"] for m in metrics)
    assert all(m["trained_rollouts"] == 16 for m in metrics)  # 4 groups x 4 samples: every kept group full
    assert len({json.loads(line)["problem_id"] for line in lines}) > 4  # refill draws further problems
    bounded = _stage1(tmp_path / "bounded", "--max-gen-batches", "2")
    assert all(m["gen_rounds"] <= 2 for m in bounded)


def test_stage1_num_epochs_ends_when_the_data_is_used_up(tmp_path):
    """16 problems, 4 prompts a round: one epoch is 4 generation batches, refill included; the
    run is complete (final/ written) after the step that used the last one."""
    metrics = _stage1(tmp_path / "epoch", "--num-epochs", "1", "--max-gen-batches", "0", "--max-steps", "50")
    assert sum(m["gen_rounds"] for m in metrics) == 4
    assert len(metrics) < 4 and (tmp_path / "epoch" / "final").is_dir()
    plain = _stage1(tmp_path / "plain", "--num-epochs", "2")
    assert len(plain) == 8 and (tmp_path / "plain" / "final").is_dir()


def test_stage1_resume_with_refill_and_mini_batches_is_bit_identical(tmp_path):
    from npr.cli.main import main
    from npr.train.tracking import deterministic_fields, read_metrics

    flags = ["--max-gen-batches", "0", "--mini-batch-size", "2"]
    straight = _stage1(tmp_path / "straight", *flags)
    _stage1(tmp_path / "resumed", *flags, "--stop-after", "1")
    assert (
        main(
            ["train", "stage1", "--preset", "smoke", "--out", str(tmp_path / "resumed"), "--quiet", "--resume", *flags]
        )
        == 0
    )
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [deterministic_fields(m) for m in straight] == [deterministic_fields(m) for m in resumed]


def test_stage1_two_processes_with_refill_and_mini_batches(tmp_path):
    """2 gloo processes vs 1: the same rounds, the same kept groups cut into the same
    mini-batches (global group order), the same global normalisers, so the same update."""
    import os
    import subprocess

    from distributed_util import torchrun

    from npr.train.tracking import read_metrics

    flags = [
        "train",
        "stage1",
        "--preset",
        "smoke",
        "--max-steps",
        "2",
        "--quiet",
        "--max-gen-batches",
        "0",
        "--mini-batch-size",
        "1",
    ]
    one = _stage1(tmp_path / "one", *flags[4:])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [*torchrun(2), "-m", "npr.cli.main", *flags, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    for a, b in zip(one, two, strict=True):
        for key in ("rollouts", "gen_rounds", "kept_groups", "optimizer_steps", "loss_units", "trained_rollouts"):
            assert a[key] == b[key], key
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["ratio_max"] == pytest.approx(b["ratio_max"], rel=1e-4)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-5, rtol=0), k


def test_stage3_drop_truncated():
    """drop_truncated false (NPR's code): a cut rollout whose tokens form complete blocks trains;
    one cut inside a step does not (no tree describes it); true drops both as finish_length."""
    from npr.models import load_model_and_tokenizer
    from npr.tokens import tag_token_ids
    from npr.train.config import Stage3Config
    from npr.train.stage3 import drop_reason

    _, tok = load_model_and_tokenizer("tiny-random-llama")
    whole = (
        "<guideline>\n<plan>1: tens</plan>\n<plan>2: units</plan>\n</guideline>\n<step>\n1: 20+30=50\n</step>\n"
        "<step>\n2: 3+4=7\n</step>\n<takeaway>\n57\n</takeaway>\nSo the answer"
    )  # cut before \boxed
    cut_in_step = whole[: whole.index("3+4")]

    def rollout(text):
        result = SimpleNamespace(
            finish_reason="length",
            prompt_ids=tok.encode("Q: 23+34?\n", add_special_tokens=False),
            token_ids=tok.encode(text, add_special_tokens=False),
            text=text,
        )
        return SimpleNamespace(result=result)

    tags = tag_token_ids(tok)
    keep = Stage3Config(model="m", train_data="x", drop_truncated=False)
    drop = Stage3Config(model="m", train_data="x")
    assert drop_reason(rollout(whole), tags, keep) is None
    assert drop_reason(rollout(cut_in_step), tags, keep) == "structure"
    assert drop_reason(rollout(whole), tags, drop) == drop_reason(rollout(cut_in_step), tags, drop) == "finish_length"
    invalid = rollout(whole)
    invalid.result.finish_reason = "invalid_schema"  # the engine ended it: never kept
    assert drop_reason(invalid, tags, keep) == "finish_invalid_schema"


def test_stage3_mini_batches(tmp_path):
    """PAPO with one Adam step per prompt group: as many steps as kept groups, no old log-probs
    (sg-ratio: the ratio metrics read 1), and the weights differ from one step per batch."""
    from npr.cli.main import main
    from npr.train.tracking import read_metrics

    for name, flags in (("one", []), ("per-group", ["--mini-batch-size", "1"])):
        assert (
            main(
                [
                    "train",
                    "stage3",
                    "--preset",
                    "smoke",
                    "--out",
                    str(tmp_path / name),
                    "--quiet",
                    "--max-steps",
                    "2",
                    *flags,
                ]
            )
            == 0
        )
    metrics = read_metrics(tmp_path / "per-group" / "metrics.jsonl")
    assert all(m["optimizer_steps"] > 1 and m["ratio_max"] == m["ratio_min"] == 1.0 for m in metrics)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "per-group")
    assert any(not torch.equal(a[k], b[k]) for k in a)
