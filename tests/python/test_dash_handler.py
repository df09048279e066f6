"""The dash-button handler against a real mosquitto broker on loopback, driven by a button
simulator that follows the CCPDashButton firmware's sequence and timeouts."""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

REPO = Path(__file__).resolve().parents[2]
HANDLER = REPO / "overlays/mqtt-handler/root/usr/local/lib/kiln/dash-handler/dash_handler.py"
TOPIC = "DashButton"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, tmp):
        self.port = free_port()
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text("listener %d 127.0.0.1\nallow_anonymous true\npersistence false\n" % self.port)
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def broker(tmp_path):
    if not shutil_which("mosquitto"):
        pytest.skip("mosquitto is not installed")
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


def shutil_which(name):
    import shutil

    return shutil.which(name) or (os.path.exists("/usr/sbin/" + name) and "/usr/sbin/" + name)


def make_client(name):
    try:
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION1, client_id=name)
    except AttributeError:
        return mqtt.Client(client_id=name)


class Button:
    """A simulated ESP32 dash button (or any listener on the topic)."""

    def __init__(self, port, dash_id):
        self.dash_id = dash_id
        self.inbox = queue.Queue()
        # Unique client ids: a broker drops the older of two connections sharing one.
        self.client = make_client("button-%s-%s" % (dash_id, uuid.uuid4().hex[:8]))
        self.client.on_message = lambda c, u, m: self.inbox.put((m.payload.decode("utf-8", "replace"), m.retain))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(TOPIC, qos=1)
        self.client.loop_start()
        time.sleep(0.3)

    def send(self, text):
        self.client.publish(TOPIC, text, qos=1).wait_for_publish(5)

    def say(self, verb, arg=None):
        msg = "%s %s %s" % (time.strftime("%H:%M:%S"), self.dash_id, verb)
        if arg:
            msg += " " + arg
        assert len(msg) <= 49
        self.send(msg)

    def expect(self, verb, timeout, arg=None):
        """Waits for a handler message with `verb` (the firmware's timeouts); returns its argument."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                text, _ = self.inbox.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                break
            parts = text.split(" ")
            if len(parts) >= 3 and parts[1] == "kiln" and parts[2] == verb:
                got = parts[3] if len(parts) > 3 else None
                if arg is None or got == arg:
                    return got
        raise AssertionError("no %s%s within %ss" % (verb, " " + arg if arg else "", timeout))

    def quiet(self, seconds):
        """Messages from the handler in the next `seconds` (ignoring our own)."""
        got = []
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                text, _ = self.inbox.get(timeout=max(0.01, deadline - time.time()))
                if " kiln " in text:
                    got.append(text)
            except queue.Empty:
                break
        return got

    def drain(self):
        while not self.inbox.empty():
            self.inbox.get_nowait()

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


class HandlerProc:
    def __init__(self, tmp, port, command, timeout=30):
        self.cfg = tmp / "handler.json"
        self.cfg.write_text(
            json.dumps(
                {
                    "broker": {"host": "127.0.0.1", "port": port, "keepalive": 5},
                    "topic": TOPIC,
                    "handler_id": "kiln",
                    "allowed_dash_ids": ["dash01", "dash02"],
                    "provision_command": command,
                    "timeout": timeout,
                    "reconnect_min_delay": 1,
                    "reconnect_max_delay": 2,
                }
            )
        )
        self.log = open(tmp / ("handler-%s.log" % uuid.uuid4().hex[:6]), "w")
        self.proc = subprocess.Popen([sys.executable, str(HANDLER), "--config", str(self.cfg)], stdout=self.log, stderr=subprocess.STDOUT)

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM):
        if self.alive():
            self.proc.send_signal(sig)
            return self.proc.wait(10)
        return self.proc.returncode


def wait_available(inbox, timeout=10):
    """Waits for the handler's StatusAvailable in a raw message queue."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline and not (seen and seen[-1].endswith("kiln StatusAvailable")):
        try:
            seen.append(inbox.get(timeout=0.5))
        except queue.Empty:
            pass
    assert seen and seen[-1].endswith("kiln StatusAvailable"), seen


def script(tmp, name, body):
    p = tmp / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


@pytest.fixture
def started(tmp_path, broker):
    handlers = []

    def start(command, timeout=30):
        h = HandlerProc(tmp_path, broker.port, command, timeout)
        handlers.append(h)
        b = Button(broker.port, "dash01")
        # The handler announces itself (retained) once connected.
        b.expect("StatusAvailable", 10)
        b.close()
        return h

    yield start
    for h in handlers:
        h.stop()


def test_full_provisioning_sequence(tmp_path, broker, started):
    calls = tmp_path / "calls"
    cmd = script(tmp_path, "prov.sh", 'echo "$1" >> %s\nsleep 1\necho "MASTER_IP=11.0.0.101"\n' % calls)
    started([cmd])
    b = Button(broker.port, "dash01")
    b.drain()
    b.say("GetStatus")
    b.expect("StatusAvailable", 3)  # the firmware waits 3 s
    name = "dash01-" + time.strftime("%H%M%S")
    b.say("ProvisionCluster", name)
    b.say("GetStatus")
    assert b.expect("StatusProvisioning", 5) == name  # 5 s
    # A press during provisioning gets StatusProvisioning again.
    b.say("GetStatus")
    assert b.expect("StatusProvisioning", 3) == name
    assert b.expect("StatusProvisioned", 30) == "11.0.0.101"
    b.say("GetStatus")
    b.expect("StatusAvailable", 3)
    assert calls.read_text().split() == [name]


def test_failing_and_hanging_commands_return_to_available(tmp_path, broker, started):
    fail = script(tmp_path, "fail.sh", 'echo "boom" >&2\nexit 3\n')
    h = started([fail])
    b = Button(broker.port, "dash01")
    b.drain()
    b.say("ProvisionCluster", "dash01-000001")
    b.expect("StatusProvisioning", 5)
    b.expect("StatusAvailable", 10)
    assert not any("StatusProvisioned" in m for m in b.quiet(0.5))
    assert h.stop() == 0

    hang = script(tmp_path, "hang.sh", "sleep 300\n")
    h = started([hang], timeout=2)
    b.drain()
    b.say("ProvisionCluster", "dash01-000002")
    b.expect("StatusProvisioning", 5)
    b.expect("StatusAvailable", 10)  # after the 2 s timeout
    b.say("GetStatus")
    b.expect("StatusAvailable", 3)
    assert h.alive()


def test_bad_messages_are_ignored_without_a_crash(tmp_path, broker, started):
    calls = tmp_path / "calls"
    cmd = script(tmp_path, "prov.sh", 'echo "$1" >> %s\necho MASTER_IP=10.0.0.1\n' % calls)
    h = started([cmd])
    b = Button(broker.port, "dash01")
    b.drain()
    stranger = Button(broker.port, "evil9")
    stranger.say("GetStatus")
    stranger.say("ProvisionCluster", "evil9-000000")
    for junk in [b"", b"hello", b"\xff\xfe\x00garbage", b"12:00:00 dash01 GetStatus " + b"x" * 60, b"x" * 500,
                 b"12:00:00 dash01 ProvisionCluster ../../etc", b"12:00:00 dash01 ProvisionCluster dash02-000000",
                 b"12:00:00 dash01 ProvisionCluster dash01-00;rm"]:
        b.send(junk)
    assert b.quiet(1.5) == [], "the handler answered a message it should ignore"
    assert h.alive()
    assert not calls.exists()
    b.say("GetStatus")
    b.expect("StatusAvailable", 3)
    stranger.close()


def test_two_buttons_at_once_get_one_provisioning(tmp_path, broker, started):
    calls = tmp_path / "calls"
    cmd = script(tmp_path, "prov.sh", 'echo "$1" >> %s\nsleep 2\necho MASTER_IP=11.0.0.5\n' % calls)
    started([cmd])
    one = Button(broker.port, "dash01")
    two = Button(broker.port, "dash02")
    one.drain()
    two.drain()
    one.say("ProvisionCluster", "dash01-111111")
    two.say("ProvisionCluster", "dash02-222222")
    first = one.expect("StatusProvisioning", 5)
    assert two.expect("StatusProvisioning", 5) == first
    one.expect("StatusProvisioned", 15)
    time.sleep(0.5)
    assert len(calls.read_text().split()) == 1


def test_killed_handler_leaves_retained_unavailable_and_sigterm_is_clean(tmp_path, broker, started):
    cmd = script(tmp_path, "prov.sh", "echo MASTER_IP=1.2.3.4\n")
    h = started([cmd])
    h.stop(signal.SIGKILL)
    time.sleep(1)
    late = Button(broker.port, "dash01")  # connects after the death: gets the retained will
    text, retained = late.inbox.get(timeout=5)
    assert retained and text.endswith("kiln StatusUnavailable"), text
    late.close()

    h = started([cmd])
    assert h.stop(signal.SIGTERM) == 0
    late = Button(broker.port, "dash01")
    text, retained = late.inbox.get(timeout=5)
    assert retained and text.endswith("kiln StatusUnavailable"), text
    late.close()


def test_a_broker_restart_is_survived(tmp_path, broker, started):
    cmd = script(tmp_path, "prov.sh", "echo MASTER_IP=1.2.3.4\n")
    h = started([cmd])
    broker.stop()
    time.sleep(2)
    broker.start()
    b = Button(broker.port, "dash01")
    b.expect("StatusAvailable", 15)  # the handler reconnected and re-announced itself
    b.drain()
    b.say("GetStatus")
    b.expect("StatusAvailable", 3)
    assert h.alive()


def test_config_errors_are_clear(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"handler_id": "kiln", "provision_command": "rm -rf /", "bogus": 1}))
    out = subprocess.run([sys.executable, str(HANDLER), "--check", "--config", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown keys bogus" in out.stderr
    cfg.write_text(json.dumps({"handler_id": "much-too-long", "provision_command": ["x"]}))
    out = subprocess.run([sys.executable, str(HANDLER), "--check", "--config", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 2 and "too long" in out.stderr


def test_broker_with_passwords(tmp_path):
    if not shutil_which("mosquitto_passwd"):
        pytest.skip("mosquitto_passwd is not installed")
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "handler", "s3cret"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "button", "pw"], check=True)
    b = Broker(tmp_path)
    # As root, mosquitto drops to its own user, which cannot read pytest's private tmp dir.
    b.conf.write_text(
        "listener %d 127.0.0.1\nallow_anonymous false\npassword_file %s\npersistence false\nuser root\n" % (b.port, passwd)
    )
    b.start()
    try:
        secret = tmp_path / "handler.secret"
        secret.write_text("s3cret\n")
        cfg = tmp_path / "auth.json"
        cfg.write_text(json.dumps({
            "broker": {"host": "127.0.0.1", "port": b.port, "username": "handler", "password_file": str(secret)},
            "handler_id": "kiln", "allowed_dash_ids": ["dash01"], "provision_command": ["/bin/true"],
        }))
        log = open(tmp_path / "auth.log", "w")
        proc = subprocess.Popen([sys.executable, str(HANDLER), "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        try:
            button = make_client("auth-button-" + uuid.uuid4().hex[:6])
            inbox = queue.Queue()
            button.on_message = lambda c, u, m: inbox.put(m.payload.decode("utf-8", "replace"))
            button.username_pw_set("button", "pw")
            button.connect("127.0.0.1", b.port)
            button.subscribe(TOPIC, qos=1)
            button.loop_start()
            wait_available(inbox)
            button.loop_stop()
            button.disconnect()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
    finally:
        b.stop()


def test_broker_over_tls_with_a_ca_file(tmp_path):
    if not shutil_which("openssl"):
        pytest.skip("openssl is not installed")

    def ossl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=kiln-test-ca", "-days", "2")
    ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    b = Broker(tmp_path)
    b.conf.write_text(
        "listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\nallow_anonymous true\npersistence false\nuser root\n"
        % (b.port, tmp_path / "ca.crt", tmp_path / "server.crt", tmp_path / "server.key")
    )
    b.start()
    try:
        cfg = tmp_path / "tls.json"
        cfg.write_text(json.dumps({
            "broker": {"host": "127.0.0.1", "port": b.port, "tls": True, "ca_file": str(tmp_path / "ca.crt")},
            "handler_id": "kiln", "allowed_dash_ids": ["dash01"], "provision_command": ["/bin/true"],
        }))
        log = open(tmp_path / "tls.log", "w")
        proc = subprocess.Popen([sys.executable, str(HANDLER), "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        try:
            button = make_client("tls-button-" + uuid.uuid4().hex[:6])
            inbox = queue.Queue()
            button.on_message = lambda c, u, m: inbox.put(m.payload.decode("utf-8", "replace"))
            button.tls_set(ca_certs=str(tmp_path / "ca.crt"))
            button.connect("127.0.0.1", b.port)
            button.subscribe(TOPIC, qos=1)
            button.loop_start()
            wait_available(inbox)
            button.loop_stop()
            button.disconnect()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
    finally:
        b.stop()
