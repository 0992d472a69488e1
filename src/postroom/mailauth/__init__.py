"""Mail authentication: DKIM signing and verification, SPF, DMARC and ARC (issue 14).

:mod:`.keys` holds the DKIM keys (files under ``data_dir/dkim`` made by ``postroom dkim
keygen``, named in ``[[dkim]]`` tables) and the DNS records that publish them.
"""
