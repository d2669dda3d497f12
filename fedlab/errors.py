"""The error type every stage raises for bad input or a failed step: a message for a person."""


class FedlabError(RuntimeError):
    """A failure the user can act on; the CLI prints its message without a traceback."""
