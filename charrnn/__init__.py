"""charrnn: character-level RNN language models: train, sample, chat.

    import charrnn
    sampler = charrnn.load("checkpoints/shakespeare-.../best")
    print(sampler.generate("ROMEO:", length=200, temperature=0.8, seed=1))
"""

__version__ = "0.1.0"

from .config import ModelConfig, SampleConfig, TrainConfig  # noqa: E402
from .errors import (  # noqa: E402
    CharRNNError,
    CheckpointError,
    ConfigError,
    CorpusError,
    PromptError,
    TrainingError,
)
from .model import CharRNN  # noqa: E402
from .sampling import ChatSession, Sampler, load  # noqa: E402
from .tokenizer import CharTokenizer  # noqa: E402

__all__ = [
    "CharRNN",
    "CharRNNError",
    "CharTokenizer",
    "ChatSession",
    "CheckpointError",
    "ConfigError",
    "CorpusError",
    "ModelConfig",
    "PromptError",
    "SampleConfig",
    "Sampler",
    "TrainConfig",
    "TrainingError",
    "load",
]
