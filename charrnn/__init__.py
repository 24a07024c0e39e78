"""charrnn: character-level RNN language models: train, sample, chat.

    import charrnn
    sampler = charrnn.load("checkpoints/shakespeare-.../best")
    print(sampler.generate("ROMEO:", length=200, temperature=0.8, seed=1))

This module is the public API and defines nothing itself; the layers below it are
described in docs/architecture.md.
"""

from ._version import __version__
from .config import ModelConfig, SampleConfig, TrainConfig
from .errors import (
    CharRNNError,
    CheckpointError,
    ConfigError,
    CorpusError,
    ExportError,
    HubError,
    MetricsError,
    PromptError,
    SessionFileError,
    TrainingError,
)
from .generation.chat import ChatSession, ChatTemplate
from .generation.sampler import Context, Continuation, Sampler, load
from .model import CharRNN, State
from .share.publish import push_to_hub
from .tokenizer import CharTokenizer

__all__ = [
    "CharRNN",
    "CharRNNError",
    "CharTokenizer",
    "ChatSession",
    "ChatTemplate",
    "CheckpointError",
    "ConfigError",
    "Context",
    "Continuation",
    "CorpusError",
    "ExportError",
    "HubError",
    "MetricsError",
    "ModelConfig",
    "PromptError",
    "SampleConfig",
    "Sampler",
    "SessionFileError",
    "State",
    "TrainConfig",
    "TrainingError",
    "__version__",
    "load",
    "push_to_hub",
]
