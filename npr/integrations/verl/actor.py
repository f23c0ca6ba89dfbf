"""Tree attention in verl's actor: log-probs scored as npr's trainer scores them.

verl's FSDP actor (``FSDPEngineWithLMHead``) runs the model causally with sequential positions over the
flat prompt + response. NPR's branches must not see each other and restart their positions at the fork,
so ``NprTreeFSDPEngine`` replaces the forward: it rebuilds each sample's tree (``npr.masks``) and positions
from its token ids and calls ``npr.train.logprobs.response_logprobs`` (flex attention on CUDA, the dense
float mask on CPU), then lays the result out as verl's engine does (a nested ``[B, j]`` tensor whose entry
``p`` is the log-prob of token ``p + 1``), so verl's loss path (``ppo_loss`` -> ``npr_papo``) is unchanged.

A response whose structure does not parse (an illegal or cut-off block) is scored causally; npr's Stage 3
drops such rollouts and the ``npr_parallel`` agent loop zeroes their response mask, so they carry no loss.

Supported: verl's default no-padding layout (``use_remove_padding``), FSDP / FSDP2, one temperature per
micro-batch, entropy in the log-prob pass (a metric, no gradient). Refused with a message: fused kernels,
an entropy loss (``entropy_coeff`` > 0), Σπ², top-k distillation, multi-modal inputs, 3-D (mrope) positions,
Ulysses sequence parallelism.
``use_tree_actor()`` makes verl build this engine for ``model_type="language_model"`` on FSDP / FSDP2.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from verl.utils import tensordict_utils as tu
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.engine.utils import detach_tree

from npr.errors import NprError
from npr.masks import StructureError
from npr.tokens import tag_token_ids
from npr.train.lm_head import DEFAULT_LOGPROB_CHUNK, output_head, selected_logprobs
from npr.train.logprobs import (
    TokenSequence,
    causal_sequence,
    resolve_attention,
    response_hidden,
    set_attention,
    structured_sequence,
)

# micro-batch flags verl sets that the tree forward cannot honour, with the setting that turns each off
UNSUPPORTED_FLAGS = {
    "use_fused_kernels": "actor_rollout_ref.model.use_fused_kernels=False",
    "calculate_sum_pi_squared": "actor_rollout_ref.actor.calculate_sum_pi_squared=False",
    "distillation_use_topk": "no top-k distillation with the tree actor",
}


def check_micro_batch(micro_batch, ulysses_size: int = 1, forward_only: bool = True) -> None:
    """NprError naming the verl option to change when ``micro_batch`` asks for what the tree forward lacks.

    Entropy comes without gradient: verl's log-prob pass (``forward_only``, entropy as a metric) gets it, a
    training step that asks for it (an entropy loss) is refused."""
    for flag, fix in UNSUPPORTED_FLAGS.items():
        if tu.get_non_tensor_data(data=micro_batch, key=flag, default=False):
            raise NprError(f"npr's tree-attention actor does not support {flag}=True; set {fix}")
    if not forward_only and tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False):
        raise NprError(
            "npr's tree-attention actor has no entropy gradient; set actor_rollout_ref.actor."
            "entropy_coeff=0 and calculate_entropy=False (PAPO has no entropy term)"
        )
    if not tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
        raise NprError(
            "npr's tree-attention actor reads verl's no-padding batches; set "
            "actor_rollout_ref.model.use_remove_padding=True"
        )
    if len(micro_batch.get("multi_modal_inputs", [])):
        raise NprError("npr's tree-attention actor is text-only; multi-modal inputs are not supported")
    if micro_batch["position_ids"].dim() == 3:
        raise NprError("npr's tree-attention actor rebuilds 1-D positions; 3-D (mrope) position ids are not supported")
    if ulysses_size > 1:
        raise NprError(
            "npr's tree-attention actor runs whole sequences per rank; set "
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1"
        )


def uniform_temperature(temperature) -> float:
    """verl's micro-batch temperature (a number or one per sample) as one float; NprError if they differ."""
    if not isinstance(temperature, torch.Tensor):
        return float(temperature)
    values = temperature.flatten().float()
    if values.numel() and not bool((values == values[0]).all()):
        raise NprError("npr's tree-attention actor takes one sampling temperature per micro-batch, got several")
    return float(values[0]) if values.numel() else 1.0


def prompt_lengths(micro_batch) -> list[int]:
    """Each sample's prompt length in verl's no-padding layout (as ``no_padding_2_padding`` reads it)."""
    prompts = micro_batch["prompts"]
    if prompts.is_nested:
        return prompts.offsets().diff().tolist()
    return micro_batch["attention_mask"][:, : prompts.shape[1]].sum(dim=1).tolist()


def tree_sequences(
    rows: Sequence[torch.Tensor], prompt_lens: Sequence[int], tag_ids: dict[str, int]
) -> tuple[list[TokenSequence], int]:
    """npr's flat sequences (tree ids and positions) of verl's rows, and how many fell back to causal."""
    sequences, causal = [], 0
    for ids, p in zip(rows, prompt_lens):
        prompt, response = ids[:p].tolist(), ids[p:].tolist()
        try:
            sequences.append(structured_sequence(prompt, response, tag_ids))
        except StructureError:
            sequences.append(causal_sequence(prompt, response))
            causal += 1
    return sequences, causal


@dataclass
class TreeLogProbs:
    """``tree_log_probs``'s result in verl's layout: nested [B, j] tensors (entry ``p`` scores token ``p + 1``)."""

    log_probs: torch.Tensor  # float32, grad
    entropy: torch.Tensor | None  # of the tempered distribution, no grad; None unless asked
    causal_fallbacks: int


def tree_log_probs(
    model,
    input_ids: torch.Tensor,
    prompt_lens: Sequence[int],
    tag_ids: dict[str, int],
    temperature: float = 1.0,
    pad_token_id: int = 0,
    attention: str | None = None,
    entropy: bool = False,
    chunk_size: int = DEFAULT_LOGPROB_CHUNK,
) -> TreeLogProbs:
    """Log-probs (and entropies) of verl's no-padding batch under npr's tree attention, in verl's layout.

    input_ids: nested LongTensor [B, j] (prompt + response per sample), prompt_lens: B ints. The forward is
    ``npr.train.logprobs.response_logprobs``'s (``response_hidden`` then the chunked head
    ``selected_logprobs``); every row needs a prompt and a response of >= 1 token. Entry ``p`` of row ``i``
    is the log-prob of token ``p + 1`` given what it sees in the tree; 0 on prompt positions and the last.
    """
    offsets = input_ids.offsets()  # [B + 1]
    rows = list(input_ids.unbind())
    sequences, causal = tree_sequences(rows, prompt_lens, tag_ids)
    hidden = response_hidden(model, sequences, pad_token_id, attention=attention)  # [P, H]
    targets = torch.cat([s.input_ids[a:b] for s in sequences for a, b in s.spans]).to(hidden.device)  # [P]
    token = selected_logprobs(hidden, output_head(model), targets, temperature, chunk_size, entropy=entropy)
    index = torch.cat(
        [
            torch.arange(int(o) + p - 1, int(o) + len(row) - 1)
            for o, p, row in zip(offsets[:-1].tolist(), prompt_lens, rows)
        ]
    ).to(hidden.device)  # [P]

    def layout(values: torch.Tensor) -> torch.Tensor:
        flat = values.new_zeros(int(offsets[-1])).index_copy(0, index, values)  # [total], differentiable
        return torch.nested.nested_tensor_from_jagged(flat, offsets.to(flat.device))

    return TreeLogProbs(layout(token.logprobs), layout(token.entropy) if entropy else None, causal)


class NprTreeFSDPEngine(FSDPEngineWithLMHead):
    """verl's FSDP language-model engine with npr's tree-attention forward (``tree_log_probs``)."""

    npr_attention: str = "auto"  # flex on CUDA, dense elsewhere (npr.train.logprobs.resolve_attention)

    def _npr_prepare(self) -> dict[str, int]:
        if getattr(self, "_npr_tag_ids", None) is None:
            tokenizer = self.model_config.tokenizer
            self._npr_tag_ids = tag_token_ids(tokenizer)
            self._npr_pad = tokenizer.pad_token_id or 0
            device = next(self.module.parameters()).device
            self._npr_layout = resolve_attention(self.npr_attention, device)
            set_attention(self.module, self._npr_layout)  # once: checkpointed backward recomputes with it
        return self._npr_tag_ids

    def forward_step(self, micro_batch, loss_function, forward_only):
        check_micro_batch(micro_batch, getattr(self, "ulysses_sequence_parallel_size", 1), forward_only)
        tag_ids = self._npr_prepare()
        device = next(self.module.parameters()).device  # verl's current device on a GPU rank; also runs on CPU
        micro_batch = micro_batch.to(device)
        autocast_dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
        autocast = (
            nullcontext()
            if autocast_dtype == torch.float32
            else torch.autocast(device_type=device.type, dtype=autocast_dtype)
        )
        with autocast:
            scored = tree_log_probs(
                self.module,
                micro_batch["input_ids"],
                prompt_lengths(micro_batch),
                tag_ids,
                temperature=uniform_temperature(micro_batch["temperature"]),
                pad_token_id=self._npr_pad,
                attention=self._npr_layout,
                entropy=bool(tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False)),
            )
            model_output = {"log_probs": scored.log_probs}
            if scored.entropy is not None:
                model_output["entropy"] = scored.entropy
            if loss_function is not None:
                loss, metrics = loss_function(
                    model_output=model_output, data=micro_batch, dp_group=self.get_data_parallel_group()
                )
            else:
                assert forward_only, "forward_only must be True when loss_function is None"
                loss, metrics = torch.tensor(1.0, device=device), {}
        metrics["actor/npr_causal_fallbacks"] = float(scored.causal_fallbacks)
        return loss, {"model_output": detach_tree(model_output), "loss": loss.detach().item(), "metrics": metrics}


def use_tree_actor(devices: Sequence[str] = ("cuda",)) -> None:
    """Make verl build ``NprTreeFSDPEngine`` for language models on FSDP / FSDP2 (in this process; the
    ``verl.plugins`` entry point calls it in every worker when ``NPR_VERL_TREE_ACTOR=1``)."""
    for backend in ("fsdp", "fsdp2"):
        registry = EngineRegistry._engines.setdefault("language_model", {}).setdefault(backend, {})
        for device in devices:
            registry[device] = NprTreeFSDPEngine
