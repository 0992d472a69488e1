"""Postroom: a mail server for an organisation's own domains."""

__version__ = "0.1.0"
