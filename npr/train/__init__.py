"""The three NPR training stages (arXiv 2512.07461 §3) and rejection sampling.

- ``stage1``: NPR-Zero, DAPO with the format + accuracy reward on plain rollouts;
- ``sample``: rejection sampling of correct, format-valid traces from the Stage-1 model;
- ``stage2``: NPR-Beta, parallel SFT with the tree attention mask;
- ``stage3``: NPR, PAPO on rollouts decoded in parallel by the engine.

``config`` holds one documented dataclass per command, ``presets`` the smoke/tiny/qwen3-4b
presets, ``overrides`` the YAML/flag layering; ``session`` the run frame (accelerate,
checkpoints, resume), ``logprobs`` the one flat masked forward every loss reads, ``update`` the
distributed-exact update, ``rollout``/``rl`` the engine side. docs/training.md is the guide.
"""
