"""Steps 6 and 7 of the seed case, the server's own reasoning, and the nine steps, as
functions: ``dns_report`` (NSLookup), ``probe`` (telnet to port 25), ``explain`` (what the
server would decide for one sender and recipient) and ``doctor`` (the seed article's nine
steps against the running server).

They use the configured nameservers, never the system's, and the same pure functions
the server runs (``policy``, ``routing``), so what they say is what the server does.

- ``dns``: ``dns_report``, and the JSON form of MX answers and DNS errors
- ``probe``: ``probe`` and its verdicts
- ``explain``: ``explain``
- ``doctor``: ``doctor``, one function per step
"""

from __future__ import annotations

from .dns import dns_report
from .doctor import VERDICTS, doctor
from .explain import explain
from .probe import PROBE_VERDICTS, probe

__all__ = ["PROBE_VERDICTS", "VERDICTS", "dns_report", "doctor", "explain", "probe"]
