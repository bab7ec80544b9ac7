"""The three ways a pipeline ends badly, each with its exit code (DESIGN.md: Exit codes)."""


class InputError(Exception):
    """The pipeline file or an input it names is invalid (exit 2).

    `key` is the dotted path of the offending key in the pipeline file, so the
    message can name file, key and what was expected on one line.
    """

    exit_code = 2

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message

    def format(self, file: str | None) -> str:
        where = f"{file}: " if file else ""
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.message}"


class GateFailed(Exception):
    """A gate failed (exit 1): raised by a stage whose failing gate ends the run there (the teacher at chance), with
    the stage's `result` so that the run's record shows the gate; and by the CLI for a run that ended with a failed
    gate, naming them."""

    exit_code = 1

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class StageFailed(Exception):
    """A stage raised at run time (exit 3)."""

    exit_code = 3

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage '{stage}' failed: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.cause = cause


class RunInterrupted(BaseException):
    """SIGTERM or SIGINT arrived while a run was working (exit 128 + signal number, the shell's convention).

    A BaseException, so that code catching Exception (a stage, Optuna's trial loop) does not swallow it and the
    run's own handler records the run as killed.
    """

    def __init__(self, signum: int):
        import signal

        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"killed by {self.signal_name}")
