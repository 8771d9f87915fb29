"""The one exception type users see.

Anything raised as `UserError` is printed by the CLI as a short paragraph (cause and fix)
with a non-zero exit and no traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, with a message that says the fix."""


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN or infinite: the run stopped there, unfinished."""

    def __init__(self, step: int, what: str, value: float, output_dir: str = ""):
        self.step, self.what, self.value = step, what, value
        super().__init__(f"Training diverged at step {step}: the {what} is {value}. The run stopped there and nothing was saved as "
                         f"finished{f' in {output_dir}' if output_dir else ''} (no adapter, no manifest). Lower --lr, or check the data.")
