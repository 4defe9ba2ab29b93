"""A minimal DeepSeek-V2 / V2-Lite runner built on the op catalogue: load a Hugging Face checkpoint (or random
weights), keep the MLA latents in a paged cache, prefill and decode in batches, sample.

    weights = load_checkpoint("DeepSeek-V2-Lite", device="cuda")      # or random_weights(PRESETS["v2-lite"], ...)
    engine = Engine(Model(weights), num_blocks=1024, block_size=64)
    out = engine.generate([[100000, 17464, 11]], max_new_tokens=32)    # out.tokens: generated ids per prompt
"""

from .cache import PagedCache
from .config import PRESETS, CheckpointError, ModelConfig
from .engine import Engine, Output
from .model import Batch, Model
from .sampler import Sampler, SamplingParams
from .weights import Tokenizer, Weights, load_checkpoint, random_weights

__all__ = ["PagedCache", "PRESETS", "CheckpointError", "ModelConfig", "Engine", "Output", "Batch", "Model", "Sampler",
           "SamplingParams", "Tokenizer", "Weights", "load_checkpoint", "random_weights"]
