"""DADRNLesion engine: liver lesion classification and weakly supervised localisation on CT.

A plain Python package with no Qt or Slicer GUI dependency; the CLI, the Slicer module and the
tests all go through `pipeline.run_pipeline`.
"""

__version__ = "0.1.0"
