"""One exception type for bad input, so the CLI can print one line and exit with its code."""


class TeleLoRAError(Exception):
    """A problem the user can fix; ``str(err)`` names the file and the fix."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class MetaparameterError(TeleLoRAError):
    """Metaparameters that fail their schema (exit code 2, as the NIST harness expects)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


class UnsupportedArchitectureError(TeleLoRAError):
    """A model whose linear layers cannot be mapped to projection types."""
