"""Selected-token log-probabilities through the output head, a chunk of tokens at a time: the
full-vocabulary logits ``[T, V]`` are never held for more than ``chunk_size`` tokens.

``response_logprobs`` (``npr.train.logprobs``) hands this module the model body's hidden states
at the predicting positions ``[N, H]``; ``selected_logprobs`` computes, per chunk of C tokens,
``lm_head`` (weight, bias), the model's own logit transform (``OutputHead``: a scale, Gemma's
softcap), the temperature, ``logsumexp`` and the gather of the target token. Only each token's
``logsumexp`` is kept ([N] floats); the backward recomputes one chunk's logits at a time and
writes its gradient into them in place. So the memory beyond the hidden states is one chunk's
fp32 ``[C, V]`` (plus its compute-dtype copy under bf16) and the head weight's ``[V, H]``
gradient, whatever N is, where the full-logits path kept ``[N, V]`` logits, their fp32 copy and
``log_softmax``'s output (12.2 V bytes per token, docs/performance.md). The same pure-torch code
runs on CPU and CUDA.

The arithmetic is that of the full path: logits in the compute dtype (bf16 under autocast,
as ``lm_head`` would produce them), then fp32 for the softmax; gradients back into the compute
dtype for the two matmuls, the weight's gradient summed over chunks in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_LOGPROB_CHUNK = 1024


@dataclass(frozen=True)
class OutputHead:
    """What turns a final hidden state into logits: ``logits = softcap(scale * (h @ weight.T + bias))``
    with ``softcap(z) = cap * tanh(z / cap)`` when ``softcap`` is set (Gemma 2/3's
    ``final_logit_softcapping``); ``scale`` is Cohere's ``logit_scale`` or Granite's
    ``1 / logits_scaling``, else 1. weight [V, H] (the embedding itself for tied models), bias [V] or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float = 1.0
    softcap: float | None = None


def output_head(model) -> OutputHead:
    """The ``OutputHead`` of an HF causal LM (through a DDP wrapper; FSDP2 wraps in place).

    Reads the transforms transformers' causal LMs apply after ``lm_head``: Gemma's
    ``final_logit_softcapping``, Cohere's ``logit_scale`` and Granite's ``logits_scaling``. Read at
    each call: under FSDP2 the weight is the unsharded parameter while the forward holds it.
    A family whose ``ForCausalLM.forward`` does anything else between its body and ``lm_head`` or
    after it (npr trains Llama, SmolLM2 and Qwen3, which do not) needs adding here, with a case in
    tests/test_train_lm_head.py that compares the family's own logits.
    """
    unwrapped = getattr(model, "module", model)
    head = unwrapped.get_output_embeddings()
    config = unwrapped.config.get_text_config()
    scale = float(getattr(unwrapped, "logit_scale", None) or getattr(config, "logit_scale", None) or 1.0)
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return OutputHead(head.weight, getattr(head, "bias", None), scale, float(softcap) if softcap else None)


@dataclass(frozen=True)
class TokenLogprobs:
    """Per token: ``logprobs`` FloatTensor[N] (fp32, with grad) at the temperature; ``untempered``
    FloatTensor[N] at temperature 1 and ``entropy`` FloatTensor[N] of the tempered distribution
    (both without grad), or None when not asked for."""

    logprobs: torch.Tensor
    untempered: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of one chunk [C, V] after the head's transform, and tanh(z / cap) [C, V] when softcapped."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()  # [C, V]
    if scale != 1.0:
        logits.mul_(scale)  # a fresh tensor: linear's output or its fp32 copy
    if softcap is None:
        return logits, None
    capped = torch.tanh(logits / softcap)  # [C, V]
    return capped * softcap, capped


class _ChunkedSelectedLogprobs(torch.autograd.Function):
    """log softmax(head(hidden) / temperature)[target] per token, one chunk of tokens at a time."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        targets,
        inv_temperature: float,
        scale: float,
        softcap,
        chunk: int,
        want_untempered: bool,
        want_entropy: bool,
    ):
        dtype = _compute_dtype(hidden, weight)
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)  # [N]
        lse = torch.empty_like(out)  # [N], the tempered logsumexp, all the backward keeps
        untempered = torch.empty_like(out) if want_untempered else out.new_empty(0)
        entropy = torch.empty_like(out) if want_entropy else out.new_empty(0)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            z, _ = _chunk_logits(hidden[start:end].to(dtype), w, b, scale, softcap)  # [C, V] fp32
            target = targets[start:end, None]  # [C, 1]
            if want_untempered:
                untempered[start:end] = z.gather(-1, target)[:, 0] - z.logsumexp(-1)
            if inv_temperature != 1.0:
                z.mul_(inv_temperature)
            picked = z.gather(-1, target)[:, 0]  # [C]
            if want_entropy:  # H = -sum_v p_v log p_v (not lse - E[z], which cancels in fp32)
                lse[start:end] = z.logsumexp(-1)
                logp = z.sub_(lse[start:end, None])  # [C, V], in place: z is spent
                entropy[start:end] = -(logp.exp() * logp).sum(-1)
                del logp
            else:  # logsumexp in place: no second [C, V] buffer
                top = z.amax(-1, keepdim=True)  # [C, 1]
                lse[start:end] = z.sub_(top).exp_().sum(-1).log_().add_(top[:, 0])
            out[start:end] = picked - lse[start:end]
            del z  # before the next chunk's logits exist: one [C, V] chunk alive, not two
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.settings = (inv_temperature, scale, softcap, chunk, dtype)
        ctx.mark_non_differentiable(untempered, entropy)
        return out, untempered, entropy

    @staticmethod
    def backward(ctx, grad_out, _grad_untempered, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        inv_temperature, scale, softcap, chunk, dtype = ctx.settings
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # [N, H]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            h = hidden[start:end].to(dtype)  # [C, H]
            z, capped = _chunk_logits(h, w, b, scale, softcap)  # [C, V]
            g = grad_out[start:end, None].float()  # [C, 1]
            # d out / d z_tempered = onehot(target) - softmax: computed in place over z
            grad = z.mul_(inv_temperature).sub_(lse[start:end, None]).exp_().mul_(-g)  # [C, V]
            grad.scatter_add_(-1, targets[start:end, None], g)
            grad.mul_(inv_temperature * scale)
            if capped is not None:  # d softcap(x) / dx = 1 - tanh^2
                grad.mul_(capped.mul_(capped).neg_().add_(1.0))
            grad = grad.to(dtype)  # [C, V]
            if need_hidden:
                grad_hidden[start:end] = (grad @ w).to(hidden.dtype)
            if need_weight:  # [V, H], summed over chunks in fp32 (in place when the compute dtype is fp32)
                if grad.dtype == grad_weight.dtype:
                    grad_weight.addmm_(grad.t(), h)
                else:
                    grad_weight.add_(grad.t() @ h)
            if need_bias:
                grad_bias.add_(grad.float().sum(0))
            del z, grad, capped  # before the next chunk's logits exist: one chunk alive, not two
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``lm_head`` would compute in: autocast's where it is on, else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def selected_logprobs(
    hidden: torch.Tensor,
    head: OutputHead,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_LOGPROB_CHUNK,
    untempered: bool = False,
    entropy: bool = False,
) -> TokenLogprobs:
    """``log p(targets[i] | hidden[i])`` under ``softmax(head(hidden) / temperature)``.

    hidden [N, H] (grad flows to it and to the head's weight and bias), targets LongTensor[N];
    ``temperature`` 0 counts as 1 (greedy rollouts). ``chunk_size`` tokens' logits ``[C, V]`` at
    a time, forward and backward. ``untempered``/``entropy`` add the temperature-1 log-prob and
    the tempered distribution's entropy, from the same pass, without grad.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    inv_temperature = 1.0 / temperature if temperature > 0 else 1.0
    logprobs, plain, ent = _ChunkedSelectedLogprobs.apply(
        hidden,
        head.weight,
        head.bias,
        targets,
        inv_temperature,
        head.scale,
        head.softcap,
        chunk_size,
        untempered,
        entropy,
    )
    return TokenLogprobs(logprobs, plain if untempered else None, ent if entropy else None)
