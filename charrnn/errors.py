"""One exception type per kind of user mistake.

Every error carries a sentence that names the problem and the fix; the command-line
front ends print it without a traceback and exit non-zero.
"""


class CharRNNError(Exception):
    """Base class of every error charrnn raises for a user mistake."""


class ConfigError(CharRNNError, ValueError):
    """An option has a value charrnn cannot use."""


class CorpusError(CharRNNError):
    """A corpus is missing, unreadable, not UTF-8 text, or too short."""


class CheckpointError(CharRNNError):
    """A checkpoint directory is missing, damaged, or does not fit the request."""


class PromptError(CharRNNError, ValueError):
    """A prompt cannot be fed to the model (too long, or no known characters)."""


class TrainingError(CharRNNError):
    """Training cannot go on (for example the loss stopped being finite)."""


class SessionFileError(CharRNNError):
    """A saved chat session is missing, damaged, or was saved from another model."""


class MetricsError(CharRNNError):
    """A run directory has no metrics to plot (missing, unreadable, or empty)."""


class PeerLostError(TrainingError):
    """Another process of a ``torchrun`` job died or cut its connection.

    Not the user's mistake and not one a restart repeats: torchrun may restart the job,
    which then resumes from the run's ``last`` save.
    """

    exit_code = 1


class ExportError(CharRNNError):
    """A model cannot be exported (a missing package, an unwritable folder)."""


class HubError(CheckpointError):
    """The Hugging Face Hub cannot give or take a model (offline, unknown repository, no permission)."""
