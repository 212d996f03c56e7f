"""The one exception type users see.

Every failure that is the user's to fix (a bad flag, a missing or corrupt file, a checkpoint that does not
match its metadata) is raised as :class:`CertkitError` with a single-line message. The CLI prints that line
to stderr and exits non-zero; anything else is a bug and keeps its traceback.
"""


class CertkitError(Exception):
    """A user-facing error whose message is one line saying what is wrong and, where possible, the fix."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for quoting a library's
    error inside a one-line :class:`CertkitError` (torch's messages run over many lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def a_or_an(word: str) -> str:
    """``word`` with its indefinite article, for messages that name a type or setting: "an int", "a str"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"
