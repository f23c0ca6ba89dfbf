"""Checkpoints in both directions: npr's ``RUN/final`` into verl, and a verl actor checkpoint back into npr."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from npr.models import load_model_and_tokenizer
from npr.tokens import tag_token_ids


def test_npr_final_loads_in_verl_with_the_tags(tmp_path, tiny_qwen3):
    """``actor_rollout_ref.model.path=RUN/final``: verl's model config reads npr's save_pretrained directory."""
    from verl.workers.config import HFModelConfig

    model, tok = tiny_qwen3
    model.save_pretrained(tmp_path)  # what npr's save_final writes
    tok.save_pretrained(tmp_path)
    config = HFModelConfig(path=str(tmp_path))
    assert tag_token_ids(config.tokenizer) == tag_token_ids(tok)
    assert config.hf_config.vocab_size == model.config.vocab_size


def test_verl_actor_checkpoint_merges_into_an_npr_model(tmp_path, tiny_qwen3):
    """verl saves the actor as FSDP shards (``global_step_N/actor``); verl's model merger writes an HF directory
    that npr loads (``npr eval --model``). The shard here is the world-size-1 layout written by hand (FSDP needs
    a process group to write it); the merge and the load are verl's and npr's own code."""
    model, tok = tiny_qwen3
    actor = tmp_path / "global_step_5" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    torch.save(model.state_dict(), actor / "model_world_size_1_rank_0.pt")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
    model.config.architectures = [type(model).__name__]  # as verl's checkpoint manager saves the HF config
    model.config.save_pretrained(actor / "huggingface")
    tok.save_pretrained(actor / "huggingface")
    target = tmp_path / "hf"
    merged = subprocess.run(
        [
            sys.executable,
            "-m",
            "verl.model_merger",
            "merge",
            "--backend",
            "fsdp",
            "--local_dir",
            str(actor),
            "--target_dir",
            str(target),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert merged.returncode == 0, merged.stderr[-3000:]

    loaded, loaded_tok = load_model_and_tokenizer(str(target))
    assert tag_token_ids(loaded_tok) == tag_token_ids(tok)
    # verl's merger writes bfloat16 (its model is built in bf16): every weight is npr's, rounded to bf16
    original = model.state_dict()
    for name, weight in loaded.state_dict().items():
        assert torch.equal(weight, original[name].to(torch.bfloat16).float()), name
