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


class ValidationError(InvalidInputError):
    """The inputs of a job are wrong: ``problems`` lists every error found (``validation.Problem``:
    the input, what is wrong, what to do); ``format(names)`` renders them with CLI flag names."""

    def __init__(self, problems, names=None):
        self.problems = [p for p in problems if p.error]
        self.warnings = [p for p in problems if not p.error]
        self.names = dict(names or {})
        super().__init__(self.format(self.names))

    def format(self, names=None) -> str:
        n = len(self.problems)
        lines = [f"{n} problem{'s' if n != 1 else ''} with the inputs; nothing was run or written:"]
        lines += [f"  - {p.render(names)}" for p in self.problems]
        return "\n".join(lines)

    @property
    def inputs(self) -> list:
        """The inputs that have at least one error."""
        return list(dict.fromkeys(p.input for p in self.problems))


class EmptyViewError(InvalidInputError):
    """The dataset or view holds no samples to work on."""


class IndexMismatchError(NolaError):
    """A stored index or checkpoint does not match the dataset, model or class list."""


class MissingEmbeddingsError(NolaError):
    """A stage needs embeddings that have not been computed yet."""


class JobBusyError(NolaError):
    """Another live job held a lock this job needs (a dataset's job, a store, a stage) for longer
    than this job waits (``NOLA_JOB_WAIT_S``)."""
