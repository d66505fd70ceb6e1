"""Giving Label Studio's webhook the basic auth header it lacks.

Connecting an ML backend makes Label Studio create a webhook to ``<backend>/webhook`` that sends no
basic auth, even when the backend object has it: with ``--basic-auth`` every annotation event would
be refused. After ``/setup`` the adapter finds that webhook through Label Studio's API (with the
project's token) and sets the header, so that connecting stays one step for a team.
"""

from __future__ import annotations

import logging

import aiohttp

from prelabel.labelstudio import api

log = logging.getLogger("prelabel.labelstudio")


async def authorize(session: aiohttp.ClientSession, url: str, token: str, project: str, user: str,
                    header: str) -> int:  # fmt: skip
    """Set ``Authorization: header`` on the project's webhooks to backends that use basic auth as ``user``;
    returns how many such webhooks there are (0: none yet, Label Studio creates it just after /setup)."""
    backends = await api.call(session, "GET", f"{url}/api/ml?project={project}", token)
    ours = {f"{b['url'].rstrip('/')}/webhook" for b in backends
            if b.get("auth_method") == "BASIC_AUTH" and b.get("basic_auth_user") == user}  # fmt: skip
    found = 0
    for hook in await api.call(session, "GET", f"{url}/api/webhooks?project={project}", token):
        if hook.get("url", "").rstrip("/") not in ours:
            continue
        found += 1
        if (hook.get("headers") or {}).get("Authorization") != header:
            headers = {**(hook.get("headers") or {}), "Authorization": header}
            await api.call(session, "PATCH", f"{url}/api/webhooks/{hook['id']}", token, {"headers": headers})
            log.info("project %s: gave Label Studio's webhook %s the basic auth header", project, hook["url"])
    return found
