"""Errors that the CLI reports as one line, without a traceback."""


class UserError(Exception):
    """A bad value given by the user (config, override, path); printed as one line."""


class UnknownChoice(UserError):
    """A name that is not one of a registry's or config group's choices."""

    def __init__(self, kind: str, value: object, choices: list[str]):
        self.kind, self.value, self.choices = kind, value, sorted(choices)
        super().__init__(f"unknown {kind} '{value}'; valid: {', '.join(self.choices)}")


class Diverged(RuntimeError):
    """A non-finite value in an iteration (samples, rewards, loss, gradients): a result, not a crash.

    The cell stops and is marked `diverged` with the iteration and the quantity; the grid's exit code stays 0."""

    def __init__(self, quantity: str, iteration: int, detail: str = ""):
        self.quantity, self.iteration = quantity, int(iteration)
        super().__init__(f"non-finite {quantity} at iteration {iteration}{': ' + detail if detail else ''}")

