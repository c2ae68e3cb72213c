"""One family of exceptions; every message says what to do next."""


class NolaError(Exception):
    """Base class of every error this library raises on purpose."""


class ModelNotFoundError(NolaError):
    """A model name, checkpoint file or download could not be resolved."""


class DatabaseUnavailableError(NolaError):
    """FiftyOne's database cannot be reached."""


class DatasetNotFoundError(NolaError):
    """A named FiftyOne dataset does not exist."""


class InvalidInputError(NolaError):
    """Bad user input: classes, fields, files, parameters."""


class EmptyViewError(InvalidInputError):
    """The dataset or view holds no samples to work on."""


class IndexMismatchError(NolaError):
    """A stored index or checkpoint does not match the dataset, model or class list."""


class MissingEmbeddingsError(NolaError):
    """A stage needs embeddings that have not been computed yet."""
