"""Errors a user can act on. The CLI prints their message on one line, without a traceback."""

from __future__ import annotations


class UserInputError(ValueError):
    """The input (image, mask, weights, options) is wrong; the message says what and what to do."""

    exit_code = 2


class NoLiverFoundError(UserInputError):
    """No liver-like region was found in the volume."""


class WeightsError(UserInputError):
    """A checkpoint is missing, corrupt, tampered with, or does not match its model card."""


class OutputExistsError(UserInputError):
    """The output folder already holds results and --overwrite was not given."""


class Cancelled(Exception):
    """The caller asked the pipeline to stop; raised between batches."""

    exit_code = 130
