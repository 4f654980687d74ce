"""argparse helpers the benchmark scripts share."""
from __future__ import annotations

import argparse


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to each option's help unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a comma list of positive integers (got {text})") from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"must be a comma list of positive integers (got {text})")
    return values


def int_list(text: str) -> list[int]:
    """An argparse `type=`: "1,4,8" -> [1, 4, 8], positive integers, at least one."""
    values = _positive_ints(text)
    if not values:
        raise argparse.ArgumentTypeError(f"must be a comma list of positive integers (got {text!r})")
    return values


def int_list_or_empty(text: str) -> list[int]:
    """An argparse `type=`: like int_list, but '' gives [] (the option's part is skipped)."""
    return _positive_ints(text)
