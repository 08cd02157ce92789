"""The base of every error a user can fix by changing a config value, a file or a command.

The recipe launcher prints such an error as one line and exits with 2; anything else keeps its
traceback (a bug). Each package defines its own subclasses beside the code that raises them.
"""


class NemoLiteError(Exception):
    """A refusal the user can act on: the message says what was wrong and what would be right."""


class ConfigError(NemoLiteError, ValueError):
    """A config value is wrong; the message names it and what would be right."""


IGNORE_INDEX = -100
"""The label that no loss is computed for (padding, prompts, the last token of a row): PyTorch's and
transformers' ``ignore_index``."""
