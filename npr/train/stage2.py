"""Stage 2, NPR-Beta (arXiv 2512.07461 §3.2): parallel SFT on the self-distilled traces.

One step::

    examples = batch of the seeded epoch order, this rank's share
    seqs     = prompt + response with the tree mask and positions (npr.masks)
    loss     = token-mean NLL of every response token over the global batch (prompt excluded)
    update   = AdamW step, lr 1e-6 decaying to 5e-7
"""

from __future__ import annotations

from pathlib import Path

from npr.data import DataError
from npr.tokens import tag_token_ids
from npr.train.config import ConfigError, Stage2Config
from npr.train.data import BatchOrder, shard
from npr.train.logprobs import pack_in_budget, structured_sequence
from npr.train.session import RunOptions, StepTimer, model_source, open_session
from npr.train.sft_data import load_sft_examples, tokenize_examples
from npr.train.update import sft_backward


def total_sft_steps(config: Stage2Config, num_examples: int) -> int:
    """``max_steps``, or ``num_epochs`` passes of ``batch_size`` examples when it is 0."""
    per_epoch = BatchOrder(num_examples, config.batch_size, config.seed).steps_per_epoch()
    return config.max_steps or config.num_epochs * per_epoch


def train_stage2(config: Stage2Config, options: RunOptions) -> Path | None:
    """Run (or resume) Stage 2; returns ``RUN/final`` or None when stopped early by ``stop_after``."""
    from npr.models import load_tokenizer

    # data errors before any compute; with a primer the self-distilled file may be empty
    examples = load_sft_examples(config.train_data, config.train_limit, allow_empty=bool(config.primer_data))
    if config.primer_data:
        examples += load_sft_examples(config.primer_data)
    tokenizer = load_tokenizer(model_source(config, options))
    kept, dropped = tokenize_examples(
        examples, tokenizer, tag_token_ids(tokenizer), config.max_seq_len, config.prompt_options()
    )
    if not kept:
        raise DataError(
            f"{config.train_data}: all {len(examples)} examples were dropped ({dict(dropped)}); "
            "nothing to train on. Check the file's responses (npr.schema.validate) or raise max_seq_len"
        )
    session = open_session("stage2", config, options, total_sft_steps(config, len(kept)))
    acc = session.accelerator
    if config.batch_size % acc.num_processes:
        raise ConfigError(
            f"config field 'batch_size': {config.batch_size} does not divide among "
            f"{acc.num_processes} processes; use a multiple of {acc.num_processes}"
        )
    session.log.note(
        f"stage2: {len(kept)} of {len(examples)} examples usable" + (f"; dropped {dict(dropped)}" if dropped else "")
    )
    tags = tag_token_ids(session.tokenizer)
    order = BatchOrder(len(kept), config.batch_size, config.seed)
    for step in session.steps():
        timer = StepTimer()
        indices, _ = shard(order.batch(step), acc.process_index, acc.num_processes)
        sequences = pack_in_budget(
            [structured_sequence(kept[i].prompt_ids, kept[i].response_ids, tags) for i in indices], config.pack_tokens
        )
        metrics = sft_backward(
            acc,
            session.model,
            sequences,
            session.tokenizer.pad_token_id,
            config.micro_batch_size,
            forward_context=session.forward_context,
            micro_batch_tokens=config.micro_batch_tokens,
            logprob_chunk_size=config.logprob_chunk_size,
        )
        metrics.update(session.optimizer_step())
        timer.lap("step")
        metrics.update(
            epoch=step * config.batch_size / len(kept),
            examples=len(kept),
            dropped=sum(dropped.values()),
            tokens_per_s=metrics["tokens"] / timer.times["time_step_s"],
            **timer.times,
        )
        session.after_step(step, metrics)
    return session.finish()
