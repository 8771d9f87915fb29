"""The one exception type users see.

Anything raised as `UserError` is printed by the CLI as a short paragraph (cause and fix)
with a non-zero exit and no traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, with a message that says the fix."""
