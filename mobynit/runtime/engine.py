"""The container engine's HTTP API over its unix socket, with the standard library.

Every request has a time limit: the manager runs from a unit at boot, and an
engine that does not answer must not hold it up for ever.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse

import attrs

from mobynit.core.errors import MobynitError, shown

DEFAULT_HOST = "unix:///var/run/docker.sock"


class EngineAPIError(MobynitError):
    """The engine did not answer, or answered something unusable."""


class UnixConnection(http.client.HTTPConnection):
    """HTTP to the engine's API socket (also used by the test harness)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@attrs.frozen
class EngineClient:
    """The engine's HTTP API on a unix socket; `timeout` bounds each socket
    operation of a request (connect, send, every read)."""

    socket_path: str
    timeout: float = 30.0

    @classmethod
    def from_host(cls, host: str, timeout: float) -> EngineClient:
        if not host.startswith("unix://"):
            raise MobynitError(f"engine address {shown(host)!r} is not unix:///path (only local sockets are supported)")
        return cls(host.removeprefix("unix://"), timeout)

    def request(self, method: str, path: str) -> tuple[int, object]:
        """(status, decoded JSON body or None)."""
        where = f"{method} {path} on {self.socket_path}"
        conn = UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            data = resp.read()
        except TimeoutError:
            raise EngineAPIError(f"{where}: no answer within {self.timeout:g} s") from None
        except FileNotFoundError:
            raise EngineAPIError(f"{where}: no such socket; is the engine running?") from None
        except (OSError, http.client.HTTPException) as e:
            raise EngineAPIError(f"{where}: {e}") from None
        finally:
            conn.close()
        if not data.strip():
            return resp.status, None
        try:
            return resp.status, json.loads(data)
        except ValueError:
            if resp.status >= 400:
                return resp.status, data.decode(errors="replace").strip()
            raise EngineAPIError(f"{where}: answered {resp.status} with a body that is not JSON") from None

    def get(self, path: str) -> object:
        status, body = self.request("GET", path)
        if status != 200:
            raise EngineAPIError(f"GET {path}: engine answered {status}: {_message(body)}")
        return body

    def _list(self, path: str, what: str) -> list[dict]:
        body = self.get(path)
        if not isinstance(body, list) or not all(isinstance(c, dict) for c in body):
            raise EngineAPIError(f"GET {path.partition('?')[0]}: the answer is not a list of {what}")
        return body

    def _object(self, path: str) -> dict | None:
        """One object's details, None if there is no such object (any more)."""
        status, body = self.request("GET", path)
        if status == 404:
            return None
        if status != 200 or not isinstance(body, dict):
            raise EngineAPIError(f"GET {path}: engine answered {status}: {_message(body)}")
        return body

    def containers(self) -> list[dict]:
        return self._list("/containers/json?all=1", "containers")

    def inspect(self, cid: str) -> dict | None:
        """The container's details, None if it went away meanwhile."""
        return self._object(f"/containers/{urllib.parse.quote(cid)}/json")

    def remove(self, cid: str) -> None:
        """Remove the container with its anonymous volumes (forced: an extension
        never runs anything worth stopping gracefully); named volumes stay.
        Gone already counts as removed."""
        path = f"/containers/{urllib.parse.quote(cid)}?force=1&v=1"
        status, body = self.request("DELETE", path)
        if status not in (204, 200, 404):
            raise EngineAPIError(f"DELETE {path}: engine answered {status}: {_message(body)}")

    def images(self) -> list[dict]:
        return self._list("/images/json", "images")

    def inspect_image(self, ref: str) -> dict | None:
        return self._object(f"/images/{urllib.parse.quote(ref, safe='')}/json")

    def remove_image(self, ref: str) -> str | None:
        """Untag or delete, never forced: None when done (or gone already), else
        the engine's reason for keeping it (a container still uses it: 409)."""
        path = f"/images/{urllib.parse.quote(ref, safe='')}"
        status, body = self.request("DELETE", path)
        if status in (200, 404):
            return None
        if status == 409:
            return _message(body)
        raise EngineAPIError(f"DELETE {path}: engine answered {status}: {_message(body)}")

    def remove_volume(self, name: str) -> str | None:
        """Delete a named volume, never forced: None when done (or gone), else why the engine keeps it (in use: 409)."""
        path = f"/volumes/{urllib.parse.quote(name, safe='')}"
        status, body = self.request("DELETE", path)
        if status in (204, 200, 404):
            return None
        if status == 409:
            return _message(body)
        raise EngineAPIError(f"DELETE {path}: engine answered {status}: {_message(body)}")


def _message(body: object) -> str:
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return shown(body["message"], 300)
    return shown(body, 300)
