"""User-facing errors: printed as one line by the CLIs (`cli.run`), never as a traceback."""


class UserError(Exception):
  """A problem with the user's input: printed as one line, exit status 2, no traceback."""


def first_line(e: BaseException, limit: int = 300) -> str:
  """The first non-empty line of an exception's message (its type name if it has none)."""
  text = str(e).strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # KeyError-style repr
    text = text[1:-1].replace("\\n", "\n").replace("\\'", "'")
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return (lines[0] if lines else type(e).__name__)[:limit]
