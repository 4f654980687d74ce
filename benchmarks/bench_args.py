"""argparse helpers the benchmark scripts share."""
from __future__ import annotations

import argparse


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to each option's help unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)
