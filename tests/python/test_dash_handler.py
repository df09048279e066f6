"""The dash-button handler as ``kiln install mqtt-handler`` puts it on a host (a real sshd on
loopback), against a real mosquitto, judged by a button simulated from the CCPDashButton firmware
(dash_button.py) with a provisioner that talks like the original cluster_creator.py.

The button runs at ``KILN_DASH_TIME_SCALE`` (default 0.25) of its real speed: every delay() is
scaled, the rounds stay 10 x loop() with one packet per call, and the handler is told the scaled
round length (``button_round_seconds``). KILN_DASH_TIME_SCALE=1 runs the firmware's real timing.
"""

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dash_button import HANDLER_UNAVAILABLE, TIMEOUT, DashButton  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "overlays/mqtt-handler/root"
HANDLER = OVERLAY / "usr/local/lib/kiln/dash-handler/dash_handler.py"
UNIT = "etc/systemd/system/kiln-dash-handler.service"
CREATOR = Path(__file__).parent / "fake_cluster_creator.py"
TOPIC = "DashButton"
SCALE = float(os.environ.get("KILN_DASH_TIME_SCALE", "0.25"))


def require(why):
    """Skips the test, or fails it under KILN_REQUIRE_TOOLS=1 (CI must not pass by skipping)."""
    if os.environ.get("KILN_REQUIRE_TOOLS") == "1":
        pytest.fail("test prerequisites missing: %s" % why)
    pytest.skip(why)


def which(name):
    return shutil.which(name) or (os.path.exists("/usr/sbin/" + name) and "/usr/sbin/" + name) or None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc=None, what="server"):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError("%s exited with %s" % (what, proc.returncode))
            time.sleep(0.05)
    raise RuntimeError("%s did not start" % what)


class Broker:
    def __init__(self, tmp, extra=""):
        self.port = free_port()
        self.conf = tmp / ("mosquitto-%d.conf" % self.port)
        self.conf.write_text("listener %d 127.0.0.1\nallow_anonymous true\npersistence false\n%s" % (self.port, extra))
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([which("mosquitto"), "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc, "mosquitto")
        return self

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def broker(tmp_path):
    if not which("mosquitto"):
        require("mosquitto is not installed")
    b = Broker(tmp_path).start()
    yield b
    b.stop()


# -- kiln install on a loopback sshd ---------------------------------------------------------------


def kiln_binary():
    if os.environ.get("KILN_BIN"):
        return Path(os.environ["KILN_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    return target / "debug" / "kiln"


class Installer:
    """``kiln install mqtt-handler --root DIR`` over ssh to root@127.0.0.1 (an sshd of our own)."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.kiln = kiln_binary()
        for name in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True)
        shutil.copy(tmp / "client.pub", tmp / "authorized_keys")
        os.chmod(tmp / "authorized_keys", 0o600)
        self.port = free_port()
        (tmp / "sshd_config").write_text(
            "Port %d\nListenAddress 127.0.0.1\nHostKey %s\nAuthorizedKeysFile %s\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPidFile %s\nSubsystem sftp internal-sftp\n"
            % (self.port, tmp / "host", tmp / "authorized_keys", tmp / "sshd.pid"))
        os.makedirs("/run/sshd", exist_ok=True)
        self.sshd = subprocess.Popen([which("sshd"), "-D", "-e", "-f", str(tmp / "sshd_config")],
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port, self.sshd, "sshd")

    def install(self, root, config):
        cfg = root.parent / (root.name + ".json")
        cfg.write_text(json.dumps(config, indent=1))
        argv = [str(self.kiln), "install", "mqtt-handler", "--root", str(root), "--config", str(cfg),
                "--target", "root@127.0.0.1"]
        # One ssh connection for all of kiln's commands and copies (ssh's own multiplexing).
        for o in ("Port=%d" % self.port, "IdentityFile=%s" % (self.tmp / "client"), "StrictHostKeyChecking=no",
                  "UserKnownHostsFile=/dev/null", "LogLevel=ERROR", "ControlMaster=auto",
                  "ControlPath=%s" % (self.tmp / "ssh-%C"), "ControlPersist=60"):
            argv += ["--ssh-option", o]
        out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, KILN_CACHE_DIR=str(self.tmp / "cache")))
        assert out.returncode == 0, out.stdout + out.stderr
        assert (root / "etc/kiln/dash-handler.json").read_bytes() == cfg.read_bytes()
        return root

    def close(self):
        subprocess.run(["ssh", "-o", "ControlPath=%s" % (self.tmp / "ssh-%C"), "-p", str(self.port), "-O", "exit",
                        "root@127.0.0.1"], capture_output=True)
        self.sshd.terminate()
        self.sshd.wait(5)


@pytest.fixture(scope="module")
def installer(tmp_path_factory):
    if os.geteuid() != 0 or not which("sshd") or not all(which(t) for t in ("ssh", "scp", "ssh-keygen")):
        require("installing the handler needs root, sshd, ssh, scp and ssh-keygen")
    if not kiln_binary().exists():
        require("%s is not built (cargo build --bin kiln)" % kiln_binary())
    i = Installer(tmp_path_factory.mktemp("sshd"))
    yield i
    i.close()


def unit_commands(root):
    """ExecStartPre and ExecStart of the installed unit, with the overlay's paths under `root`."""
    commands = []
    for line in (root / UNIT).read_text().splitlines():
        key, _, value = line.partition("=")
        if key in ("ExecStartPre", "ExecStart"):
            argv = shlex.split(value)
            commands.append([str(root / a.lstrip("/")) if (root / a.lstrip("/")).exists() else a for a in argv])
    return commands


class HandlerProc:
    """The installed handler, started as its systemd unit says (--check first)."""

    def __init__(self, root, log):
        pre, start = unit_commands(root)
        check = subprocess.run(pre, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.log = log
        self.proc = subprocess.Popen(start, stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM):
        if self.alive():
            self.proc.send_signal(sig)
            return self.proc.wait(10)
        return self.proc.returncode

    def text(self):
        return Path(self.log).read_text()


def make_client(name):
    try:
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION1, client_id=name)
    except AttributeError:
        return mqtt.Client(client_id=name)


class Listener:
    """A plain MQTT client on the topic: watches what goes by, and can speak for a button."""

    def __init__(self, port, **auth):
        self.inbox = queue.Queue()
        self.client = make_client("listener-" + uuid.uuid4().hex[:8])
        self.client.on_message = lambda c, u, m: self.inbox.put((m.payload.decode("utf-8", "replace"), m.retain))
        self.react = None
        if auth.get("username"):
            self.client.username_pw_set(auth["username"], auth.get("password"))
        if auth.get("ca_file"):
            self.client.tls_set(ca_certs=auth["ca_file"])
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(TOPIC, qos=1)
        self.client.loop_start()

    def send(self, text):
        self.client.publish(TOPIC, text, qos=1).wait_for_publish(5)

    def next(self, timeout):
        return self.inbox.get(timeout=timeout)

    def collect(self, seconds, prefix=""):
        got, deadline = [], time.time() + seconds
        while time.time() < deadline:
            try:
                text, retained = self.inbox.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                break
            if text.split(" ")[1:2] == [prefix] or not prefix:
                got.append((text, retained))
        return got

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def wait_ready(port, handler_id="MyHandler", dash_id="Dash01", timeout=20, **auth):
    """Asks as a button until the handler answers (it subscribes after connecting)."""
    probe = Listener(port, **auth)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            probe.send("%s %s GetStatus" % (time.strftime("%H:%M:%S"), dash_id))
            for text, _ in probe.collect(0.2, handler_id):
                return text
        raise AssertionError("the handler did not answer within %ss" % timeout)
    finally:
        probe.close()


class Lab:
    """A broker, the installed handler and a cluster_creator-like provisioner."""

    def __init__(self, tmp, installer, broker):
        self.tmp, self.installer, self.broker = tmp, installer, broker
        self.skeleton = tmp / "creation_payload.json"
        self.handlers = []

    def start(self, sleep=0.5, modes=(), timeout=30, **overrides):
        self.skeleton.write_text(json.dumps({"sleep": sleep, "modes": list(modes)}))
        config = {
            "broker": {"host": "127.0.0.1", "port": self.broker.port, "keepalive": 5},
            # The firmware's defaults: topic DashButton, handlerID MyHandler, dashButtonID Dash01.
            "allowed_dash_ids": ["Dash01", "Dash02"],
            # As the bash MQTTHandler ran it; master_ip_pattern is left to its default.
            "provision_command": ["/usr/bin/python3", str(CREATOR), "ccp.example.org", "admin", "secret",
                                  "{cluster}", "172.200.0.0/16", str(self.skeleton), "calico"],
            "timeout": timeout,
            "button_round_seconds": DashButton(0, time_scale=SCALE).round_seconds,
            "reconnect_min_delay": 1,
            "reconnect_max_delay": 2,
        }
        config.update(overrides)
        root = self.installer.install(self.tmp / ("root-%d" % len(self.handlers)), config)
        h = HandlerProc(root, self.tmp / ("handler-%d.log" % len(self.handlers)))
        self.handlers.append(h)
        wait_ready(self.broker.port, config.get("handler_id", "MyHandler"))
        return h

    def button(self, **config):
        return DashButton(self.broker.port, time_scale=SCALE, **config)

    def calls(self):
        p = Path(str(self.skeleton) + ".calls")
        return p.read_text().split() if p.exists() else []

    def pids(self):
        p = Path(str(self.skeleton) + ".pids")
        return [int(x) for x in p.read_text().split()] if p.exists() else []

    def close(self):
        for h in self.handlers:
            h.stop()
        for pid in self.pids():  # provisioners a killed handler left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def lab(tmp_path, installer, broker):
    lab = Lab(tmp_path, installer, broker)
    yield lab
    lab.close()


def shows_ip(press, name, ip):
    assert press.result == [name, ip, "is ready."], press.explain()
    assert press.faults == [], press.explain()


def running(pid):
    """Whether a process exists and is not a zombie (PID 1 of a container may not reap them)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(fn, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fn():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for " + what)


# -- the firmware's presses ------------------------------------------------------------------------


def test_every_press_ends_showing_the_master_ip(lab):
    lab.start(sleep=0.5)
    button = lab.button()  # the sketch's defaults: Dash01, MyHandler, DashButton
    started = time.time()
    for n in range(1, 21):
        press = button.press()
        name = lab.calls()[-1] if lab.calls() else None
        assert len(lab.calls()) == n, press.explain()
        shows_ip(press, name, "11.0.0.%d" % n)
        # The wire format the firmware really sends (ino:147 and ino:160-170).
        assert re.match(r"^\d\d:\d\d:\d\d Dash01 GetStatus$", press.sent[0]), press.sent
        assert re.match(r"^(\d{6}) Dash01 ProvisionCluster dash01-\1$", press.sent[1]), press.sent
        assert name == press.sent[1].split()[-1]
    print("20 presses in %.1f s at time scale %s" % (time.time() - started, SCALE))


def test_a_provisioner_faster_than_a_round_still_shows_the_ip(lab):
    # StatusProvisioned right behind StatusProvisioning would land in the button's confirmation
    # round, and the button would see only the last status of that round (ino:396-407).
    lab.start(sleep=0)
    for n in range(1, 4):
        shows_ip(lab.button().press(), lab.calls()[-1], "11.0.0.%d" % n)


def test_a_status_asked_for_at_the_moment_of_the_result_does_not_hide_it(lab):
    # Another button asks for the status just as the result goes out; its answer must not land in
    # the round in which the waiting button reads StatusProvisioned (ino:447-465).
    lab.start(sleep=1)
    other = Listener(lab.broker.port)
    seen = []

    def on_message(client, userdata, msg):
        text = msg.payload.decode()
        seen.append((time.time(), text))
        if " StatusProvisioned " in text:
            client.publish(TOPIC, "%s Dash02 GetStatus" % time.strftime("%H:%M:%S"), qos=0)

    other.client.on_message = on_message
    try:
        press = lab.button().press()
        shows_ip(press, lab.calls()[-1], "11.0.0.1")
        wait_until(lambda: seen[-1][1].endswith(" MyHandler StatusAvailable"), 5, "the answer")
    finally:
        other.close()
    result = next(at for at, t in seen if " StatusProvisioned " in t)
    answer = next(at for at, t in seen if t.endswith(" MyHandler StatusAvailable") and at > result)
    # ... and the other button still gets its answer within its 30 x 100 ms (ino:367-373).
    assert 1.0 * SCALE < answer - result < 3.0 * SCALE, seen


def test_a_second_press_follows_the_running_cluster(lab):
    lab.start(sleep=3)
    first = lab.button().start_press()
    wait_until(lambda: first.display[:1] == ["Provisioning"], 10, "the first press to show Provisioning")
    name = first.cluster_name
    # The same button pressed again (a reset: ino has only setup()), and a second button.
    first.reset()
    again = lab.button().start_press()
    second = lab.button(dash_button_id="Dash02").start_press()
    for p in (again, second):
        p.join(60)
        shows_ip(p, name, "11.0.0.1")
    assert lab.calls() == [name]


def test_failing_and_hanging_provisioners_return_the_handler_to_available(lab):
    h = lab.start(sleep=0.3, modes=["fail", "hang"], timeout=2)
    failed = lab.button().press()
    # The status leaves StatusProvisioning without a result: the firmware can only say Timeout,
    # and says it now rather than after averageProvisioningTime + 120 s.
    assert failed.result == TIMEOUT, failed.explain()
    t = time.time()
    hung = lab.button().press()
    assert hung.result == TIMEOUT, hung.explain()
    assert time.time() - t < 10
    # The hanging command is gone, and so is the child it was waiting on.
    assert len(lab.pids()) == 3 and not [pid for pid in lab.pids() if running(pid)]
    shows_ip(lab.button().press(), lab.calls()[-1], "11.0.0.3")
    assert h.alive()
    assert "failed (exit 1)" in h.text() and "timed out after 2" in h.text()


def test_an_unknown_button_gets_nothing(lab):
    h = lab.start()
    stranger = lab.button(dash_button_id="Dash99").press()
    assert stranger.result == HANDLER_UNAVAILABLE, stranger.explain()
    assert not [m for m in stranger.trace if "MyHandler" in m], stranger.explain()
    assert lab.calls() == []
    assert "unknown dash button 'Dash99'" in h.text()
    # A button that expects another handler ID never hears this one either.
    other = lab.button(handler_id="OtherHandler").press()
    assert other.result == HANDLER_UNAVAILABLE, other.explain()


def test_a_broker_restart_mid_provisioning(lab):
    h = lab.start(sleep=5)
    first = lab.button().start_press()
    wait_until(lambda: first.display[:1] == ["Provisioning"], 10, "the press to show Provisioning")
    name = first.cluster_name
    lab.broker.stop()
    lab.broker.start()
    wait_ready(lab.broker.port)
    # The running press lost its connection, and the firmware only reconnects before its first
    # wait (ino:363-366): it cannot hear the result any more (it would show Timeout after
    # averageProvisioningTime + 120 s). Pressed again, the button follows the running cluster.
    wait_until(lambda: first.mqtt.sock is None, 5, "the press to notice that it lost the broker")
    first.reset()
    again = lab.button().press()
    shows_ip(again, name, "11.0.0.1")
    assert lab.calls() == [name]
    assert h.alive() and h.text().count("connected to") >= 2


def test_a_dead_handler_is_told_to_waiting_buttons_and_nothing_is_retained(lab):
    h = lab.start(sleep=30)
    waiting = lab.button().start_press()
    wait_until(lambda: waiting.display[:1] == ["Provisioning"], 10, "the press to show Provisioning")
    h.stop(signal.SIGKILL)
    # The broker sends the last will: the button stops waiting (Timeout is all it can show).
    assert waiting.join(10 + 30 * SCALE) == TIMEOUT, waiting.explain()
    late = Listener(lab.broker.port)
    try:
        assert late.collect(1) == [], "something was left retained on the topic"
    finally:
        late.close()
    h = lab.start()
    watcher = Listener(lab.broker.port)
    try:
        assert h.stop(signal.SIGTERM) == 0
        said = watcher.collect(1, "MyHandler")
        assert [t.split(" ", 1)[1] for t, _ in said] == ["MyHandler StatusUnavailable"], said
        assert not any(r for _, r in said)
    finally:
        watcher.close()


def test_bad_messages_are_ignored_without_a_crash(lab):
    h = lab.start()
    sender = Listener(lab.broker.port)
    try:
        for junk in [b"", b"hello", b"\xff\xfe\x00garbage", b"12:00:00 Dash01 GetStatus " + b"x" * 60, b"x" * 500,
                     b"12:00:00 Dash01 ProvisionCluster ../../etc", b"120000 Dash01 ProvisionCluster dash02-120000",
                     b"120000 Dash01 ProvisionCluster dash01-12;rm", b"12:00 Dash01 GetStatus",
                     b"1200000 Dash01 GetStatus", b"12:00:00 Dash99 ProvisionCluster dash99-120000"]:
            sender.client.publish(TOPIC, junk, qos=1).wait_for_publish(5)
        assert sender.collect(1.5, "MyHandler") == [], "the handler answered a message it should ignore"
    finally:
        sender.close()
    assert h.alive()
    assert lab.calls() == []
    shows_ip(lab.button().press(), lab.calls()[-1], "11.0.0.1")


# -- configuration ---------------------------------------------------------------------------------


def check(tmp_path, config):
    cfg = tmp_path / "check.json"
    cfg.write_text(json.dumps(config))
    return subprocess.run([sys.executable, str(HANDLER), "--check", "--config", str(cfg)],
                          capture_output=True, text=True)


def test_the_sketch_defaults_are_accepted_and_lengths_the_button_cannot_take_are_refused(tmp_path):
    ok = check(tmp_path, {"allowed_dash_ids": ["Dash01"], "provision_command": ["x"]})
    assert ok.returncode == 0, ok.stderr  # handler_id defaults to the sketch's MyHandler
    ok = check(tmp_path, {"handler_id": "x" * 24, "allowed_dash_ids": ["Dash0001"], "provision_command": ["x"]})
    assert ok.returncode == 0, ok.stderr
    for config, says in [
        ({"handler_id": "x" * 25, "provision_command": ["x"]}, "25-byte buffer"),
        ({"allowed_dash_ids": ["Dash00001"], "provision_command": ["x"]}, "up to 8"),
        ({"handler_id": "Dash01", "allowed_dash_ids": ["Dash01"], "provision_command": ["x"]}, "also the handler_id"),
        ({"topic": "t" * 40, "handler_id": "x" * 24, "provision_command": ["x"]}, "drops packets over 128"),
        ({"topic": "dash/#", "provision_command": ["x"]}, "wildcards"),
        ({"provision_command": "rm -rf /", "bogus": 1}, "unknown keys bogus"),
        ({"provision_command": "rm -rf /"}, "list of strings"),
    ]:
        out = check(tmp_path, config)
        assert out.returncode == 2 and says in out.stderr, (config, out.stderr)


def test_the_default_master_ip_pattern_reads_cluster_creator_output():
    sys.path.insert(0, str(HANDLER.parent))
    try:
        import dash_handler
    finally:
        sys.path.pop(0)
    pattern = re.compile(dash_handler.DEFAULTS["master_ip_pattern"])
    # ccp-provisioner/cluster_creator.py:85-95, and the MASTER_IP= form of shell scripts.
    out = "Creating cluster dash01-234717 on ccp.example.org... please standby.\nMaster IP: 10.1.2.3\n"
    assert pattern.search(out).group(1) == "10.1.2.3"
    assert pattern.search("MASTER_IP=11.0.0.101\n").group(1) == "11.0.0.101"
    assert pattern.search("master-ip = 192.168.1.1").group(1) == "192.168.1.1"
    assert pattern.search("Unable to create cluster dash01-234717 on ccp.example.org") is None


# -- broker options (the handler from the source tree) ----------------------------------------------


def run_handler(tmp_path, config, name):
    cfg = tmp_path / (name + ".json")
    cfg.write_text(json.dumps(config))
    log = open(tmp_path / (name + ".log"), "w")
    return subprocess.Popen([sys.executable, str(HANDLER), "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)


def test_broker_with_passwords(tmp_path):
    if not which("mosquitto") or not which("mosquitto_passwd"):
        require("mosquitto and mosquitto_passwd are not installed")
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "handler", "s3cret"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "mqttuser", "mqttpassword"], check=True)
    # As root, mosquitto drops to its own user, which cannot read pytest's private tmp dir.
    b = Broker(tmp_path)
    b.conf.write_text("listener %d 127.0.0.1\nallow_anonymous false\npassword_file %s\npersistence false\nuser root\n"
                      % (b.port, passwd))
    b.start()
    try:
        secret = tmp_path / "handler.secret"
        secret.write_text("s3cret\n")
        proc = run_handler(tmp_path, {
            "broker": {"host": "127.0.0.1", "port": b.port, "username": "handler", "password_file": str(secret)},
            "allowed_dash_ids": ["Dash01"], "provision_command": ["/bin/echo", "Master IP: 10.9.8.7"],
            "button_round_seconds": SCALE,
        }, "auth")
        try:
            wait_ready(b.port, username="mqttuser", password="mqttpassword")
            # The button logs in with the sketch's mqtt_user and mqtt_password (ino:250).
            press = DashButton(b.port, time_scale=SCALE).press()
            assert press.result[1:] == ["10.9.8.7", "is ready."], press.explain()
            wrong = DashButton(b.port, time_scale=SCALE, mqtt_password="wrong").press()
            assert wrong.result == ["MQTT connection", "failed"], wrong.explain()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
    finally:
        b.stop()


def test_broker_over_tls_with_a_ca_file(tmp_path):
    if not which("mosquitto") or not which("openssl"):
        require("mosquitto and openssl are not installed")

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
        % (b.port, tmp_path / "ca.crt", tmp_path / "server.crt", tmp_path / "server.key"))
    b.start()
    try:
        proc = run_handler(tmp_path, {
            "broker": {"host": "127.0.0.1", "port": b.port, "tls": True, "ca_file": str(tmp_path / "ca.crt")},
            "allowed_dash_ids": ["Dash01"], "provision_command": ["/bin/true"],
        }, "tls")
        try:
            assert wait_ready(b.port, ca_file=str(tmp_path / "ca.crt")).endswith(" MyHandler StatusAvailable")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
    finally:
        b.stop()
