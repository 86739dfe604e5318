"""Measuring on another machine: a small HTTP agent on the target and a ``remote://`` client.

Protocol (every request carries ``Authorization: Bearer TOKEN``):

* ``GET /info`` -> the agent device's ``DeviceInfo`` as JSON (header ``X-Max-Bytes``: the largest
  model it accepts);
* ``POST /measure`` with headers ``X-Input-Shape: 1,3,224,224`` and optionally ``X-Profile: 1``,
  body = the serialized ONNX model -> the ``Measurement`` as JSON.

The agent only ever parses ONNX (validated with ``onnx.checker``) and JSON: nothing it receives is
unpickled or executed as code, and models whose tensors point at external data files are refused
(they would make the runtime open files on the agent's machine). The agent binds 127.0.0.1 unless
told otherwise; the token is compared in constant time. Errors are JSON ``{"error": "..."}``
with 401 (missing or wrong token), 413 (body over the limit, refused before reading it), 400
(malformed request or model), 422 (a valid model that fails to run) or 404; the agent keeps
serving after each of them.
Measurements run one at a time: concurrent timing on one machine would corrupt both results.
"""

from __future__ import annotations

import hmac
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from email.message import Message
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from autocomp.errors import AutocompError
from autocomp.hardware.base import Device, DeviceInfo, Measurement, OnnxModel
from autocomp.hardware.onnx_io import model_bytes, one_line, parse_onnx

TOKEN_ENV = "AUTOCOMP_DEVICE_TOKEN"
#: Largest input tensor the agent allocates (elements), so a header cannot exhaust its memory.
MAX_INPUT_ELEMENTS = 100_000_000
#: Seconds a client may take to send a request before the agent drops it.
REQUEST_TIMEOUT_S = 60.0


class AgentServer(ThreadingHTTPServer):
    """The agent: an HTTP server that owns one local device, a token and a size limit."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], *, device: Device, token: str, max_bytes: int
    ) -> None:
        super().__init__(address, _Handler)
        self.device = device
        self.token = token.encode()
        self.max_bytes = max_bytes
        self.measure_lock = threading.Lock()


def make_server(
    *, host: str = "127.0.0.1", port: int = 8765, token: str, max_bytes: int, device: Device
) -> AgentServer:
    """A bound, not yet serving agent (``port=0`` picks a free port: see ``server_address``)."""
    if not token:
        raise AutocompError(f"the agent needs a token: pass --token or set ${TOKEN_ENV}")
    if max_bytes <= 0:
        raise AutocompError(f"the size limit must be positive, got {max_bytes} bytes")
    try:
        return AgentServer((host, port), device=device, token=token, max_bytes=max_bytes)
    except OSError as err:
        raise AutocompError(f"cannot listen on {host}:{port} ({one_line(err)})") from None


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    max_bytes: int = 256_000_000,
    threads: int = 1,
) -> None:
    """Serve ``cpu`` measurements until Ctrl-C (token from ``token`` or $AUTOCOMP_DEVICE_TOKEN)."""
    from autocomp.hardware.ort_device import OrtDevice

    token = token or os.environ.get(TOKEN_ENV, "")
    server = make_server(
        host=host, port=port, token=token, max_bytes=max_bytes, device=OrtDevice(threads)
    )
    bound_host, bound_port = server.server_address[:2]
    if threading.current_thread() is threading.main_thread():
        # Stop on Ctrl-C and on SIGTERM (service managers) alike, even where the agent was
        # started in the background and inherited an ignored SIGINT (Python then installs no
        # KeyboardInterrupt handler of its own).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler)
    print(f"serving on http://{bound_host}:{bound_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: AgentServer
    timeout = REQUEST_TIMEOUT_S
    server_version = "autocomp-agent"

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path != "/info":
            self._reply(404, {"error": f"no such endpoint: GET {self.path}"})
            return
        self._reply(
            200, self.server.device.info.to_dict(), {"X-Max-Bytes": str(self.server.max_bytes)}
        )

    def do_POST(self) -> None:
        if not self._authorized():
            return
        if self.path != "/measure":
            self._refuse(404, f"no such endpoint: POST {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            self._refuse(400, "missing or malformed Content-Length")
            return
        if length > self.server.max_bytes:
            self._refuse(
                413,
                f"model of {length} bytes is over this agent's limit of "
                f"{self.server.max_bytes} bytes",
            )
            return
        try:
            shape = _parse_shape(self.headers.get("X-Input-Shape", ""))
        except AutocompError as err:
            self._refuse(400, str(err))
            return
        try:
            body = self.rfile.read(length)
        except OSError:  # the client stalled or went away
            self.close_connection = True
            return
        if len(body) != length:
            self._reply(400, {"error": f"body ended after {len(body)} of {length} bytes"})
            return
        try:
            model = parse_onnx(body)
        except AutocompError as err:
            self._reply(400, {"error": str(err)})
            return
        profile = self.headers.get("X-Profile", "0").strip() == "1"
        try:
            with self.server.measure_lock:
                result = self.server.device.measure(model, shape, profile=profile)
        except AutocompError as err:
            self._reply(422, {"error": str(err)})
            return
        except Exception as err:  # the agent outlives any model that breaks the runtime
            self._reply(422, {"error": f"the model failed to run: {one_line(err)}"})
            return
        self._reply(200, result.to_dict())

    def _authorized(self) -> bool:
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.server.token
        ):
            return True
        self._refuse(401, "missing or wrong token (send 'Authorization: Bearer TOKEN')")
        return False

    def _reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, status: int, message: str) -> None:
        """Answer without reading the body into memory, then close gracefully.

        Closing a socket that still holds unread request bytes makes the kernel send a reset,
        which can destroy our answer before the client reads it; so stop writing, discard what
        the client is still sending for up to two seconds, and only then close.
        """
        self.close_connection = True
        self._reply(status, {"error": message}, {"Connection": "close"})
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 2.0
            self.connection.settimeout(0.5)
            while time.monotonic() < deadline and self.connection.recv(65536):
                pass
        except OSError:
            pass


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise AutocompError(f"X-Input-Shape {text!r} is not like 1,3,224,224") from None
    if not 1 <= len(shape) <= 8 or any(d <= 0 for d in shape):
        raise AutocompError(f"X-Input-Shape {text!r} needs 1 to 8 positive dimensions")
    elements = 1
    for d in shape:
        elements *= d
    if elements > MAX_INPUT_ELEMENTS:
        raise AutocompError(f"X-Input-Shape {text!r} is over {MAX_INPUT_ELEMENTS} elements")
    return shape


class RemoteDevice:
    """A device on another machine, reached through its ``autocomp device serve`` agent."""

    def __init__(self, spec: str, *, token: str | None = None, timeout_s: float = 3600.0):
        parts = urlsplit(spec)
        try:
            port = parts.port
        except ValueError:
            port = None
        if (
            parts.scheme != "remote"
            or not parts.hostname
            or port is None
            or parts.path
            not in (
                "",
                "/",
            )
        ):
            raise AutocompError(f"remote device {spec!r} is not like remote://HOST:PORT")
        self.spec = spec
        self.address = f"{parts.hostname}:{port}"
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.url = f"http://{host}:{port}"
        self.token = token or os.environ.get(TOKEN_ENV, "")
        if not self.token:
            raise AutocompError(f"remote device {spec} needs the agent's token: set ${TOKEN_ENV}")
        self.timeout_s = timeout_s

    @property
    def info(self) -> DeviceInfo:
        """The agent's own device identity (its profile is the agent machine's)."""
        return self._agent[0]

    @cached_property
    def _agent(self) -> tuple[DeviceInfo, int]:
        payload, headers = self._request("GET", "/info")
        try:
            return DeviceInfo.from_dict(payload), int(headers.get("X-Max-Bytes") or 0)
        except (KeyError, TypeError, ValueError) as err:
            raise AutocompError(
                f"agent at {self.address} sent an unreadable device description ({one_line(err)})"
            ) from None

    def measure(
        self, onnx_model: OnnxModel, input_shape: tuple[int, ...], *, profile: bool = False
    ) -> Measurement:
        """Send the model to the agent and return what it measured there."""
        data = model_bytes(onnx_model)
        limit = self._agent[1]
        if limit and len(data) > limit:
            raise AutocompError(
                f"the model ({len(data)} bytes) is over the agent's limit of {limit} bytes "
                f"(agent {self.address}, see 'autocomp device serve --max-mb')"
            )
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Input-Shape": ",".join(str(int(d)) for d in input_shape),
            "X-Profile": "1" if profile else "0",
        }
        payload, _ = self._request("POST", "/measure", data, headers)
        try:
            return Measurement.from_dict(payload)
        except (KeyError, TypeError, ValueError) as err:
            raise AutocompError(
                f"agent at {self.address} sent an unreadable measurement ({one_line(err)})"
            ) from None

    def _request(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[Any, Message]:
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body, reply_headers = response.read(), response.headers
        except urllib.error.HTTPError as err:
            raise AutocompError(
                f"agent at {self.address} refused the request ({err.code}): {_error_text(err)}"
            ) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise AutocompError(
                f"cannot reach the measurement agent at {self.address} ({one_line(reason)}); "
                "start one there with 'autocomp device serve'"
            ) from None
        try:
            return json.loads(body), reply_headers
        except ValueError:
            raise AutocompError(f"agent at {self.address} sent a reply that is not JSON") from None


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        return one_line(json.loads(err.read())["error"])
    except Exception:
        return one_line(err.reason) if err.reason else "no details"
