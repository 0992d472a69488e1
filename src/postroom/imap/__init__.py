"""The imap component: users read their mail over IMAP, through a Dovecot that Postroom
runs, configures, feeds with its users and supervises (docs/store.md).

- :mod:`.dovecot`: finding Dovecot, the files under ``<data_dir>/imap/`` and the
  ``dovecot.conf`` Postroom writes;
- :mod:`.owner`: who owns the mail, and the Maildir store that keeps it so;
- :mod:`.passwd`: Dovecot's users, written from the user store;
- :mod:`.service`: the supervisor (:class:`ImapService`);
- :mod:`.check`: the store's health for ``postroom doctor``.
"""

from __future__ import annotations

from .dovecot import INSTALL_IMAP, INSTALL_LMTP, Installation, Layout, find_dovecot
from .owner import OwnedMaildirStore, Owner, mail_owner
from .service import ImapService, store_routes

__all__ = ["INSTALL_IMAP", "INSTALL_LMTP", "ImapService", "Installation", "Layout", "Owner",
           "OwnedMaildirStore", "find_dovecot", "mail_owner", "store_routes"]
