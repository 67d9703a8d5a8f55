"""Errors that the CLI reports as one line, without a traceback."""


class UserError(Exception):
    """A bad value given by the user (config, override, path); printed as one line."""


class UnknownChoice(UserError):
    """A name that is not one of a registry's or config group's choices."""

    def __init__(self, kind: str, value: object, choices: list[str]):
        self.kind, self.value, self.choices = kind, value, sorted(choices)
        super().__init__(f"unknown {kind} '{value}'; valid: {', '.join(self.choices)}")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf: the cell stops and is marked failed."""
