"""Dashboard screens: help, the persona picker, the error banner and its details."""

from .errors import ErrorBanner, ErrorScreen
from .help import HelpScreen
from .personas import PersonaPicker

__all__ = ["ErrorBanner", "ErrorScreen", "HelpScreen", "PersonaPicker"]
