"""The exceptions whose message the CLI prints as a single line (no traceback)."""


class CosmoesError(Exception):
    """A problem with the user's input or environment, stated in one line."""


class InvalidValue(CosmoesError):
    """One parameter's value is out of range. The library names the parameter as its API does (``top_p``); the CLI
    shows it as the flag that set it (``--top-p``)."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"{name} {problem}")

    def as_flag(self) -> str:
        return f"--{self.name.replace('_', '-')} {self.problem}"
