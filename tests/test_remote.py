"""The measurement agent measures for token holders only, refuses bad requests, keeps serving."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import onnx
import pytest
from onnx_models import conv_net, fails_at_run, with_external_data

from autocomp import cli
from autocomp.errors import AutocompError
from autocomp.hardware import Measurement, RemoteDevice, Timing, get_device, make_server, serve
from autocomp.hardware.ort_device import OrtDevice

TOKEN = "s3cret-token"
LIMIT = 50_000
FAST = Timing(warmup_runs=3, warmup_s=0.0, min_runs=30, min_s=0.05, max_runs=300)
MODEL = conv_net().SerializeToString()
EXTERNAL = with_external_data().SerializeToString()


def _start(device, max_bytes=LIMIT):
    server = make_server(host="127.0.0.1", port=0, token=TOKEN, max_bytes=max_bytes, device=device)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def agent():
    server, thread = _start(OrtDevice(timing=FAST))
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _spec(server) -> str:
    return f"remote://127.0.0.1:{server.server_address[1]}"


def _request(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _post(server, body=MODEL, *, token=TOKEN, shape="1,3,32,32", extra=None):
    headers = {"X-Input-Shape": shape, **(extra or {})}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return _request(server, "POST", "/measure", body, headers)


def test_remote_measures_on_the_agent_and_reports_its_device(agent):
    device = RemoteDevice(_spec(agent), token=TOKEN)
    assert device.info == agent.device.info
    m = device.measure(conv_net(), (1, 3, 32, 32))
    assert isinstance(m, Measurement)
    assert len(m.samples) >= 30 and m.p10_ms <= m.median_ms <= m.p90_ms
    assert m.info == agent.device.info.with_batch(1)
    profiled = device.measure(MODEL, (1, 3, 32, 32), profile=True)
    assert "Conv" in profiled.node_ops.values()
    assert set(profiled.node_times_ms) == set(profiled.node_ops)


def test_token_comes_from_the_environment(agent, monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOCOMP_DEVICE_TOKEN", TOKEN)
    device = get_device(_spec(agent))
    assert device.info.profile == agent.device.info.profile
    path = tmp_path / "conv.onnx"
    onnx.save(conv_net(), path)
    assert device.measure(path, (1, 3, 32, 32)).info.kind == "cpu"


def test_agent_rejections_and_it_keeps_serving(agent):
    cases = [
        (_post(agent, token=None), 401, "missing or wrong token"),
        (_post(agent, token="wrong"), 401, "missing or wrong token"),
        (_post(agent, token=TOKEN + "x"), 401, "missing or wrong token"),
        (_request(agent, "GET", "/info"), 401, "missing or wrong token"),
        (_post(agent, body=b"\0" * (LIMIT + 1)), 413, f"over this agent's limit of {LIMIT} bytes"),
        (_post(agent, body=b"garbage, not onnx"), 400, "not a valid ONNX model ("),
        (_post(agent, body=b""), 400, "not a valid ONNX model ("),
        (_post(agent, body=EXTERNAL), 400, "models with external data files are not accepted"),
        (_post(agent, shape=""), 400, "X-Input-Shape '' is not like 1,3,224,224"),
        (_post(agent, shape="1,3,x,32"), 400, "X-Input-Shape '1,3,x,32' is not like"),
        (_post(agent, shape="1,0,32,32"), 400, "needs 1 to 8 positive dimensions"),
        (_post(agent, shape="1000,3,1000,1000"), 400, "is over 100000000 elements"),
        (_post(agent, shape="1,3,31,32"), 422, "does not fit the model's input"),
        (_post(agent, body=fails_at_run().SerializeToString()), 422, "the model failed to run"),
        (_post(agent, extra={"X-Profile": "1"}, shape="2,3"), 422, "does not fit"),
        (_request(agent, "GET", "/nothing", headers=_auth()), 404, "no such endpoint"),
    ]
    for (status, payload), expected_status, phrase in cases:
        assert status == expected_status, payload
        assert phrase in payload["error"]
    status, payload = _post(agent)
    assert status == 200
    assert Measurement.from_dict(payload).info == agent.device.info


def _auth():
    return {"Authorization": f"Bearer {TOKEN}"}


def test_missing_content_length_is_refused(agent):
    conn = http.client.HTTPConnection("127.0.0.1", agent.server_address[1], timeout=30)
    conn.putrequest("POST", "/measure")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("X-Input-Shape", "1,3,32,32")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 400
    assert json.loads(response.read())["error"] == "missing or malformed Content-Length"
    conn.close()
    assert _post(agent)[0] == 200


def test_client_errors_are_one_line(agent):
    with pytest.raises(AutocompError) as err:
        RemoteDevice(_spec(agent), token="wrong").measure(MODEL, (1, 3, 32, 32))
    port = agent.server_address[1]
    assert str(err.value) == (
        f"agent at 127.0.0.1:{port} refused the request (401): "
        "missing or wrong token (send 'Authorization: Bearer TOKEN')"
    )
    with pytest.raises(AutocompError, match=r"refused the request \(422\): input shape 1,3,8,8"):
        RemoteDevice(_spec(agent), token=TOKEN).measure(MODEL, (1, 3, 8, 8))
    small, thread = _start(agent.device, max_bytes=1000)
    try:
        with pytest.raises(AutocompError, match=r"over the agent's limit of 1000 bytes"):
            RemoteDevice(_spec(small), token=TOKEN).measure(MODEL, (1, 3, 32, 32))
    finally:
        small.shutdown()
        small.server_close()
        thread.join(timeout=5)


def test_unreachable_agent_and_bad_specs(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AutocompError) as err:
        _ = RemoteDevice(f"remote://127.0.0.1:{port}", token=TOKEN).info
    assert str(err.value).startswith(f"cannot reach the measurement agent at 127.0.0.1:{port} (")
    for spec in ("remote://", "remote://host", "remote://host:99999", "remote://h:1/path"):
        with pytest.raises(AutocompError, match="is not like remote://HOST:PORT"):
            RemoteDevice(spec, token=TOKEN)
    with pytest.raises(AutocompError, match=r"threads are set where it runs: autocomp device"):
        get_device("remote://127.0.0.1:8765", threads=2)
    monkeypatch.delenv("AUTOCOMP_DEVICE_TOKEN", raising=False)
    with pytest.raises(
        AutocompError, match=r"needs the agent's token: set \$AUTOCOMP_DEVICE_TOKEN"
    ):
        get_device("remote://127.0.0.1:8765")


def test_agent_refuses_to_start_without_a_token(monkeypatch):
    monkeypatch.delenv("AUTOCOMP_DEVICE_TOKEN", raising=False)
    with pytest.raises(AutocompError) as err:
        serve(host="127.0.0.1", port=0, token=None)
    assert str(err.value) == "the agent needs a token: pass --token or set $AUTOCOMP_DEVICE_TOKEN"


class _SlowDevice:
    """Records how many measurements overlap; the agent must never run two at once."""

    def __init__(self, info):
        self.info = info
        self.active = self.most = 0
        self.lock = threading.Lock()

    def measure(self, onnx_model, input_shape, *, profile=False):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(0.2)
        with self.lock:
            self.active -= 1
        return Measurement(1.0, 1.0, 1.0, (1.0,), self.info.with_batch(input_shape[0]))


def test_agent_measures_one_model_at_a_time():
    device = _SlowDevice(OrtDevice().info)
    server, thread = _start(device)
    try:
        results = []
        clients = [
            threading.Thread(target=lambda: results.append(_post(server)[0])) for _ in range(3)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join(timeout=10)
        assert results == [200, 200, 200]
        assert device.most == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_cli_measures_through_the_agent(agent, monkeypatch, tmp_path, capsys):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_net(), path)
    monkeypatch.setenv("AUTOCOMP_DEVICE_TOKEN", TOKEN)
    assert cli.main(["measure", "--model", str(path), "--device", _spec(agent), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["info"]["profile"] == agent.device.info.profile
    monkeypatch.setenv("AUTOCOMP_DEVICE_TOKEN", "wrong")
    assert cli.main(["measure", "--model", str(path), "--device", _spec(agent)]) == 2
    out, err = capsys.readouterr()
    ours = [line for line in err.splitlines() if line.startswith("autocomp")]  # not agent's log
    assert out == "" and len(ours) == 1 and "refused the request (401)" in ours[0]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_device_serve_command_starts_and_stops_on_ctrl_c_or_sigterm(stop):
    # Started as a background job is: with SIGINT ignored, which Python would otherwise inherit.
    def background() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "AUTOCOMP_DEVICE_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "autocomp.cli", "device", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=background,
    )
    try:
        first = proc.stdout.readline()
        assert first == f"serving on http://127.0.0.1:{port}\n"
        info = RemoteDevice(f"remote://127.0.0.1:{port}", token=TOKEN).info
        assert info.kind == "cpu" and info.threads == 1
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert out == "stopped\n"
    assert re.search(r'"GET /info HTTP/1\.1" 200', err)
    assert "Traceback" not in err
