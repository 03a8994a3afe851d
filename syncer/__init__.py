"""Engage audience batch syncer: keeps Tray.io workflows told who is in which audience."""

__version__ = "0.1.0"
