"""The one exception type for user mistakes; the CLI turns it into one line and exit code 2."""


class UserError(Exception):
    """A mistake in the user's input: message says what, where (file, line, key) and what was expected."""


class EncodingError(UserError):
    """A text input that is not valid UTF-8; the message names the file, line and byte offset."""
