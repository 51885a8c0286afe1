"""`dadrn-lesion bench`: see DADRNLesionLib.bench."""

from ..bench import add_parser, run  # noqa: F401
