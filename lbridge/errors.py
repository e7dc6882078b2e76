"""User-facing errors: the CLI prints these as one line, without a traceback."""


class LbridgeError(Exception):
    """Bad input or missing resources; the message names the bad value and what is accepted."""
