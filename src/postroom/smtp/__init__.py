"""SMTP: the sans-I/O protocol core and the asyncio server around it."""
