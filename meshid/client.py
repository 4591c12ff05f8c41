"""A small client of the server's admin API over its Unix socket.

Owns transport and error translation only: a problem-details answer becomes ``AdminError`` with
the server's one-line detail, a socket that cannot be reached becomes ``AdminError`` saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

CLIENT_TIMEOUT = 30.0  # seconds; signing and rotation answer well within this


class AdminError(Exception):
    """An admin call failed; ``str()`` is the line the CLI prints."""


class AdminClient:
    def __init__(self, socket_path: Path, *, timeout: float = CLIENT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url="http://meshid-admin",
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise AdminError(
                f"cannot reach the meshid server at {self.socket_path}: {err or type(err).__name__}"
            ) from err
        if response.status_code >= 400:
            raise AdminError(_problem_line(response))
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()


def _problem_line(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"server answered {response.status_code}: {response.text[:200]}"
    if isinstance(body, dict) and "detail" in body:
        return f"{body.get('title', 'error')}: {body['detail']}"
    return f"server answered {response.status_code}"
