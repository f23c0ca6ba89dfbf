"""Benchmark: memory of response log-probs + backward per response token, full-logits path vs chunked.

A one-layer Qwen3-shaped model with Qwen3's 151,936-token vocabulary (hidden 64, fp32, untied
head), one causal sequence of a 16-token prompt and T response tokens; ``response_logprobs`` +
``backward`` of the summed log-probs, at several T, one fresh process per measurement:

- ``full``: the path npr trained with before (``response_logits``: [T, V] logits, their fp32
  copy, temperature, ``log_softmax`` kept for the backward), as tests/test_train_lm_head.py's reference;
- ``chunked``: ``response_logprobs`` today (npr.train.lm_head: the head by chunks of ``--chunk``
  tokens, recomputed in the backward).

Extra memory is the peak above the process's memory before the pass (CPU: peak resident set,
``ru_maxrss`` against the resident set at entry; CUDA: the allocator's peak). The per-token cost is
the slope between the lengths, printed in units of V bytes (V = 151,936): what one more response
token costs, whatever the constant (weights' gradients, one chunk). Temperature 0.7, as rollouts use.

    python benchmarks/logprob_memory.py [--device cpu|cuda] [--lengths 1024 2048 3072] [--chunk 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

VOCAB = 151_936
PROMPT = 16


def tiny_qwen3_with_real_vocab(device: str):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().to(device).train()


def full_logits_logprobs(model, sequences, temperature: float) -> torch.Tensor:
    """The full-logits path: [T, V] logits per response, fp32, tempered, log_softmax, gather."""
    from npr.train.logprobs import response_logits

    logits = response_logits(model, sequences, 0, attention="dense")
    targets = [s.input_ids[a:b] for s in sequences for a, b in s.spans]
    return torch.cat(
        [
            (z.float() / temperature).log_softmax(-1).gather(-1, t.to(z.device)[:, None])[:, 0]
            for z, t in zip(logits, targets)
        ]
    )


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(path: str, length: int, chunk: int, device: str) -> int:
    """Bytes above the memory at entry, at the peak of one log-prob pass + backward."""
    from npr.train.logprobs import causal_sequence, response_logprobs, set_attention

    model = tiny_qwen3_with_real_vocab(device)
    set_attention(model, "dense")
    generator = torch.Generator().manual_seed(length)

    def run(n: int) -> None:
        ids = torch.randint(0, VOCAB, (PROMPT + n,), generator=generator).tolist()
        sequences = [causal_sequence(ids[:PROMPT], ids[PROMPT:])]
        if path == "full":
            logprobs = full_logits_logprobs(model, sequences, 0.7)
        else:
            logprobs = response_logprobs(model, sequences, 0, temperature=0.7, chunk_size=chunk)[0]
        logprobs.sum().backward()
        model.zero_grad(set_to_none=False)  # gradients stay allocated: the constant is the same at every length

    run(8)  # warm-up: libraries, kernels, gradient buffers
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run(length)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    start = _resident()
    run(length)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 3072])
    parser.add_argument("--chunk", type=int, default=256, help="logprob_chunk_size of the chunked path")
    parser.add_argument("--one", nargs=2, metavar=("PATH", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps({"bytes": measure(args.one[0], int(args.one[1]), args.chunk, args.device)}))
        return
    print(
        f"device {args.device}, vocab {VOCAB}, 1 layer, hidden 64, fp32, prompt {PROMPT}, temperature 0.7, "
        f"chunk {args.chunk}; one process per measurement"
    )
    print(f"{'path':>8} {'T':>6} {'extra MiB':>10} {'V bytes/token':>14}")
    slopes = {}
    for path in ("full", "chunked"):
        points = []
        for length in args.lengths:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--device",
                    args.device,
                    "--chunk",
                    str(args.chunk),
                    "--one",
                    path,
                    str(length),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            extra = json.loads(out.stdout.strip().splitlines()[-1])["bytes"]
            points.append((length, extra))
            print(f"{path:>8} {length:>6} {extra / 2**20:>10.1f} {extra / length / VOCAB:>14.2f}")
        (t0, m0), (t1, m1) = points[0], points[-1]
        slopes[path] = (m1 - m0) / (t1 - t0) / VOCAB
    print(
        f"per response token (slope {args.lengths[0]}..{args.lengths[-1]}): full {slopes['full']:.2f} V bytes, "
        f"chunked {slopes['chunked']:.2f} V bytes ({slopes['full'] / max(slopes['chunked'], 1e-9):.0f}x less)"
    )


if __name__ == "__main__":
    main()
