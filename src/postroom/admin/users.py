"""Mailboxes and admin accounts: list, add, remove, reset a password, the console's
login check, and the store's health (can each user log in over IMAP, can Dovecot and
Postroom both use each Maildir)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Protocol, runtime_checkable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..users import UserError, add_mailbox, mailbox_key
from .common import AdminBackend, Context, Endpoint, _by, json_body


@runtime_checkable
class StoreChecking(Protocol):
    """A backend that runs the imap component (``postroom serve``'s)."""

    async def store_check(self) -> dict[str, Any]: ...


def routes(backend: AdminBackend, ctx: Context) -> list[Endpoint]:
    login_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="login")

    async def users_list(request: Request) -> Response:
        admins_only = request.query_params.get("admin") in ("1", "true", "yes")
        found = await asyncio.get_running_loop().run_in_executor(
            None, backend.users.list, admins_only)
        return JSONResponse({"users": [{"address": u.address, "created": u.created,
                                        "admin": u.admin} for u in found],
                             "local_domains": list(backend.config.local_domains)})

    async def user_add(request: Request) -> Response:
        body = await json_body(request)
        config = backend.config
        key, maildir, warning = await asyncio.get_running_loop().run_in_executor(
            None, lambda: add_mailbox(backend.users, config, str(body.get("address", "")),
                                      str(body.get("password", "")),
                                      admin=bool(body.get("admin"))))
        backend.events.emit(1008, f"mailbox {key} added" + (" (admin)" if body.get("admin")
                                                            else "") + _by(body))
        return JSONResponse({"added": key, "maildir": str(maildir), "warning": warning})

    async def user_remove(request: Request) -> Response:
        body = await json_body(request)
        store = backend.users

        def remove(address: str) -> str:
            admins = [u.address for u in store.list(admins_only=True)]
            if admins == [mailbox_key(address)]:
                raise UserError(f"{admins[0]} is the last admin account: add another "
                                "(--admin) before removing it, or nobody could log in to "
                                "the console")
            return store.remove(address)
        key = await asyncio.get_running_loop().run_in_executor(
            None, remove, request.path_params["address"])
        backend.events.emit(1008, f"mailbox {key} removed (its Maildir is kept)" + _by(body))
        return JSONResponse({"removed": key})

    async def user_password(request: Request) -> Response:
        body = await json_body(request)
        key = await asyncio.get_running_loop().run_in_executor(
            None, backend.users.set_password, request.path_params["address"],
            str(body.get("password", "")))
        backend.events.emit(1008, f"password of {key} reset" + _by(body))
        return JSONResponse({"changed": key})

    async def user_verify(request: Request) -> Response:
        """For the console's login: is this an admin account with this password?"""
        body = await json_body(request)
        store = backend.users
        loop = asyncio.get_running_loop()
        # on a pool of its own: a flood of logins (argon2, about 20 ms each) must not
        # hold up the threads that serve the API's reads
        key = await loop.run_in_executor(login_pool, store.verify,
                                         str(body.get("address", "")),
                                         str(body.get("password", "")))
        admins = await loop.run_in_executor(None, store.list, True)
        admin = key is not None and any(u.address == key for u in admins)
        return JSONResponse({"ok": key is not None, "address": key, "admin": admin})

    async def store(request: Request) -> Response:
        """For doctor's store step: each problem of the store with its fix."""
        if not isinstance(backend, StoreChecking):
            return JSONResponse({"enabled": False, "problems": [],
                                 "summary": "this server runs no imap component"})
        return JSONResponse(await backend.store_check())

    return [
        Endpoint("/api/store", store),
        Endpoint("/api/users", users_list),
        Endpoint("/api/users", user_add, ["POST"]),
        Endpoint("/api/users/verify", user_verify, ["POST"]),
        Endpoint("/api/users/{address}/remove", user_remove, ["POST"]),
        Endpoint("/api/users/{address}/password", user_password, ["POST"]),
    ]
