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
    MetricsError,
    PromptError,
    SessionFileError,
    TrainingError,
)
from .model import CharRNN  # noqa: E402
from .sampling import Sampler, load  # noqa: E402
from .tokenizer import CharTokenizer  # noqa: E402

__all__ = [
    "CharRNN",
    "CharRNNError",
    "CharTokenizer",
    "ChatSession",
    "ChatTemplate",
    "CheckpointError",
    "ConfigError",
    "CorpusError",
    "MetricsError",
    "ModelConfig",
    "PromptError",
    "SampleConfig",
    "Sampler",
    "SessionFileError",
    "TrainConfig",
    "TrainingError",
    "load",
]

# The chat names load on first use: `python -m charrnn.chat` must not find charrnn.chat
# imported already (runpy warns, and the module would run twice).
_CHAT_NAMES = ("ChatSession", "ChatTemplate")


def __getattr__(name: str):
    if name in _CHAT_NAMES:
        from . import chat

        return getattr(chat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
