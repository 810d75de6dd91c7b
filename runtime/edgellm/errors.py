"""Errors a user can act on.

Every error edgellm raises on purpose derives from EdgeLLMError and carries a message that
says what was expected, what was found and what to do. The CLI prints the message alone
(no traceback) and exits non-zero; the daemon maps the classes to gRPC status codes.
"""


class EdgeLLMError(Exception):
    """Base class: an expected failure with a message meant for a person."""


class ConfigError(EdgeLLMError):
    """A checkpoint, profile, option or config file is not what edgellm supports."""


class EngineFormatError(EdgeLLMError):
    """An engine directory is missing, malformed, tampered with, or made for another device."""


class DeviceMismatchError(EngineFormatError):
    """The engine was built for other GPUs (SMs) than the one it is asked to run on."""


class RequestError(EdgeLLMError):
    """A generation request is invalid (too long, empty, bad sampling parameters...)."""
