"""Error types that the command line turns into one clear message, no traceback."""


class CnnkitError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""


class ConfigError(CnnkitError):
    """A recipe, override or command-line value is invalid."""


class DataError(CnnkitError):
    """A dataset is missing, corrupt or inconsistent."""


class NoImagesFound(DataError):
    """A folder (or archive) given as a dataset of images holds no image files where class folders go."""


class ImageDecodeError(DataError):
    """One image file could not be decoded (or breaks a limit)."""

    def __init__(self, path: str, reason: str, kind: str = "invalid"):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.kind = kind  # "invalid" (not a readable image), "too_large" (a limit), "empty", "unreadable"


class RunError(CnnkitError):
    """A run folder or checkpoint is missing or unusable."""


class TrainingError(CnnkitError):
    """Training cannot go on (for example the loss became NaN)."""


class TrainingInterrupted(TrainingError):
    """SIGINT or SIGTERM: a checkpoint was saved; exit with 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
