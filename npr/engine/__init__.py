"""The NPR engine: parallel branch decoding with a shared, paged KV cache on any HF causal LM."""

from npr.engine.config import MODES, EngineConfig, EngineInputError, SamplingParams
from npr.engine.engine import Engine, EngineEvent, RequestStats, Result
from npr.engine.forcing import StructureForcer, TokenFuzzer
from npr.engine.state import FinishReason, StreamDelta, StreamKind

__all__ = [
    "MODES",
    "Engine",
    "EngineConfig",
    "EngineEvent",
    "EngineInputError",
    "FinishReason",
    "RequestStats",
    "Result",
    "SamplingParams",
    "StreamDelta",
    "StreamKind",
    "StructureForcer",
    "TokenFuzzer",
]
