#!/usr/bin/python3
"""kiln's handler for the CCPDashButton: answers ESP32 dash buttons over MQTT and provisions a
cluster when an authorised button asks for one.

Wire protocol (kept compatible with the button firmware): one topic (default ``DashButton``);
every message is ``HH:MM:SS SenderID Verb [Argument]``, at most 49 characters. Buttons send
``GetStatus`` and ``ProvisionCluster <dashid>-<hhmmss>``; the handler answers ``StatusAvailable``,
``StatusUnavailable``, ``StatusProvisioning <name>`` and ``StatusProvisioned <master-ip>``.

Unlike the bash loop it replaces: buttons must be on an allow-list, the provisioning command is an
argv list run without a shell (the validated cluster name is its last argument), one provisioning
runs at a time, a failing or hanging command returns the handler to available, a retained
last-will ``StatusUnavailable`` marks a dead handler, reconnects back off, and SIGTERM stops it
cleanly. Runs on any Python 3.7+ with paho-mqtt 1.x or 2.x.
"""

import argparse
import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt

MAX_MESSAGE = 49
MESSAGE_RE = re.compile(r"^(\d{2}:\d{2}:\d{2}) ([A-Za-z0-9_-]{1,16}) ([A-Za-z]{1,24})(?: (\S{1,24}))?$")
# A button's own request "HH:MM:SS <id> ProvisionCluster <id>-<hhmmss>" fits 49 characters only
# for ids of up to 7 characters, so cluster names are at most 7 + 1 + 6.
NAME_RE = re.compile(r"^[a-z0-9_]{1,7}-\d{6}$")
LONGEST_NAME = 7 + 1 + 6
LONGEST_IP = 15

log = logging.getLogger("dash-handler")

DEFAULTS = {
    "broker": {
        "host": "localhost",
        "port": 1883,
        "username": None,
        "password_file": None,
        "tls": False,
        "ca_file": None,
        "keepalive": 30,
    },
    "topic": "DashButton",
    "handler_id": "kiln",
    "allowed_dash_ids": [],
    "provision_command": [],
    "timeout": 900,
    "master_ip_pattern": r"(?:MASTER_IP|master[ _-]?ip)\s*[=:]\s*(\d{1,3}(?:\.\d{1,3}){3})",
    "reconnect_min_delay": 1,
    "reconnect_max_delay": 60,
}


class ConfigError(Exception):
    pass


def load_config(path):
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError("cannot read config %s: %s" % (path, e))
    if not isinstance(raw, dict):
        raise ConfigError("%s: the config must be a JSON object" % path)
    unknown = set(raw) - set(DEFAULTS)
    if unknown:
        raise ConfigError("%s: unknown keys %s" % (path, ", ".join(sorted(unknown))))
    cfg = dict(DEFAULTS)
    cfg.update(raw)
    broker = dict(DEFAULTS["broker"])
    broker.update(raw.get("broker") or {})
    unknown = set(broker) - set(DEFAULTS["broker"])
    if unknown:
        raise ConfigError("%s: unknown broker keys %s" % (path, ", ".join(sorted(unknown))))
    cfg["broker"] = broker
    if not re.match(r"^[A-Za-z0-9_-]{1,16}$", cfg["handler_id"]):
        raise ConfigError("handler_id must be 1-16 letters, digits, '-' or '_'")
    # Every answer must fit the firmware's 49-character buffer.
    worst = len("00:00:00 %s StatusProvisioning " % cfg["handler_id"]) + LONGEST_NAME
    if worst > MAX_MESSAGE:
        raise ConfigError(
            "handler_id %r is too long: answers would exceed %d characters" % (cfg["handler_id"], MAX_MESSAGE)
        )
    cmd = cfg["provision_command"]
    if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
        raise ConfigError("provision_command must be a non-empty list of strings (argv, no shell)")
    if not isinstance(cfg["allowed_dash_ids"], list):
        raise ConfigError("allowed_dash_ids must be a list")
    try:
        cfg["_ip_re"] = re.compile(cfg["master_ip_pattern"])
    except re.error as e:
        raise ConfigError("master_ip_pattern: %s" % e)
    if cfg["_ip_re"].groups < 1:
        raise ConfigError("master_ip_pattern needs a group that captures the IP")
    return cfg


def parse_message(payload):
    """(time, sender, verb, argument) or None for anything malformed or too long."""
    try:
        text = payload.decode("ascii")
    except (UnicodeDecodeError, AttributeError):
        return None
    if len(text) > MAX_MESSAGE:
        return None
    m = MESSAGE_RE.match(text)
    return m.groups() if m else None


class Handler:
    def __init__(self, cfg, client_factory=mqtt.Client):
        self.cfg = cfg
        self.lock = threading.Lock()
        self.provisioning = None  # the cluster name while a provisioning runs
        self.stopping = threading.Event()
        self.worker = None
        self.client = self._make_client(client_factory)

    # -- MQTT plumbing -------------------------------------------------------------------------

    def _make_client(self, factory):
        client_id = "kiln-dash-%s" % self.cfg["handler_id"]
        try:  # paho-mqtt 2.x wants the callback API version first
            client = factory(mqtt.CallbackAPIVersion.VERSION1, client_id=client_id, clean_session=True)
        except AttributeError:
            client = factory(client_id=client_id, clean_session=True)
        b = self.cfg["broker"]
        if b["username"]:
            password = None
            if b["password_file"]:
                with open(b["password_file"], encoding="utf-8") as f:
                    password = f.read().strip()
            client.username_pw_set(b["username"], password)
        if b["tls"]:
            client.tls_set(ca_certs=b["ca_file"])
        client.will_set(self.cfg["topic"], self._message("StatusUnavailable"), qos=1, retain=True)
        client.reconnect_delay_set(self.cfg["reconnect_min_delay"], self.cfg["reconnect_max_delay"])
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _message(self, verb, argument=None):
        text = "%s %s %s" % (time.strftime("%H:%M:%S"), self.cfg["handler_id"], verb)
        if argument:
            text += " " + argument
        if len(text) > MAX_MESSAGE:
            raise ValueError("message too long for the button: %r" % text)
        return text

    def publish(self, verb, argument=None, retain=False):
        text = self._message(verb, argument)
        log.info("-> %s", text)
        self.client.publish(self.cfg["topic"], text, qos=1, retain=retain)

    def _on_connect(self, client, userdata, flags, rc):
        if rc != 0:
            log.error("broker refused the connection (rc=%s)", rc)
            return
        log.info("connected to %s:%s", self.cfg["broker"]["host"], self.cfg["broker"]["port"])
        client.subscribe(self.cfg["topic"], qos=1)
        # Replace a retained StatusUnavailable (our last will) with the current state.
        with self.lock:
            name = self.provisioning
        if name:
            self.publish("StatusProvisioning", name, retain=True)
        else:
            self.publish("StatusAvailable", retain=True)

    def _on_disconnect(self, client, userdata, rc):
        if not self.stopping.is_set():
            log.warning("lost the broker (rc=%s); reconnecting with backoff", rc)

    # -- protocol --------------------------------------------------------------------------------

    def _on_message(self, client, userdata, msg):
        try:
            self.handle(msg.payload)
        except Exception:  # a bad message must never kill the handler
            log.exception("error handling %r", msg.payload)

    def handle(self, payload):
        parsed = parse_message(payload)
        if parsed is None:
            log.warning("ignoring malformed message %r", payload[:80])
            return
        _, sender, verb, argument = parsed
        if sender == self.cfg["handler_id"] or verb.startswith("Status"):
            return  # our own answers, or another handler's
        if sender not in self.cfg["allowed_dash_ids"]:
            log.warning("ignoring %s from unknown dash button %r", verb, sender)
            return
        if verb == "GetStatus":
            with self.lock:
                name = self.provisioning
            if name:
                self.publish("StatusProvisioning", name)
            else:
                self.publish("StatusAvailable")
        elif verb == "ProvisionCluster":
            self.provision(sender, argument)
        else:
            log.warning("ignoring unknown verb %r from %s", verb, sender)

    def provision(self, sender, name):
        if not name or not NAME_RE.match(name) or not name.startswith(sender.lower() + "-"):
            log.warning("ignoring ProvisionCluster with invalid cluster name %r from %s", name, sender)
            return
        with self.lock:
            if self.provisioning:
                running = self.provisioning
            else:
                running = None
                self.provisioning = name
        if running:
            # A press during provisioning (or a second button) gets the running one.
            self.publish("StatusProvisioning", running)
            return
        self.publish("StatusProvisioning", name, retain=True)
        self.worker = threading.Thread(target=self._run, args=(name,), daemon=True)
        self.worker.start()

    def _run(self, name):
        argv = list(self.cfg["provision_command"]) + [name]
        log.info("provisioning %s: %s", name, argv)
        ip = None
        try:
            proc = subprocess.run(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=self.cfg["timeout"],
                check=False,
            )
            output = proc.stdout.decode("utf-8", "replace")
            if proc.returncode != 0:
                log.error("provisioning %s failed (exit %s): %s", name, proc.returncode, output[-2000:])
            else:
                m = self.cfg["_ip_re"].search(output)
                if m and len(m.group(1)) <= LONGEST_IP:
                    ip = m.group(1)
                else:
                    log.error("provisioning %s finished but printed no master IP", name)
        except subprocess.TimeoutExpired:
            log.error("provisioning %s timed out after %ss; killed", name, self.cfg["timeout"])
        except OSError as e:
            log.error("cannot run the provisioning command: %s", e)
        finally:
            with self.lock:
                self.provisioning = None
        if ip:
            self.publish("StatusProvisioned", ip)
        self.publish("StatusAvailable", retain=True)

    # -- life cycle ------------------------------------------------------------------------------

    def run(self):
        b = self.cfg["broker"]
        delay = self.cfg["reconnect_min_delay"]
        while not self.stopping.is_set():
            try:
                self.client.connect(b["host"], int(b["port"]), keepalive=int(b["keepalive"]))
                break
            except OSError as e:
                log.warning("cannot reach the broker at %s:%s (%s); retrying in %ss", b["host"], b["port"], e, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, self.cfg["reconnect_max_delay"])
        self.client.loop_start()
        self.stopping.wait()
        # A clean stop tells the buttons, retained, that no handler is listening.
        info = self.client.publish(self.cfg["topic"], self._message("StatusUnavailable"), qos=1, retain=True)
        try:
            info.wait_for_publish(timeout=5)
        except (TypeError, RuntimeError, ValueError):
            pass
        self.client.disconnect()
        self.client.loop_stop()

    def stop(self, *_):
        log.info("stopping")
        self.stopping.set()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="/etc/kiln/dash-handler.json")
    ap.add_argument("--check", action="store_true", help="validate the config and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    if args.check:
        print("config ok: %s" % args.config)
        return 0
    handler = Handler(cfg)
    signal.signal(signal.SIGTERM, handler.stop)
    signal.signal(signal.SIGINT, handler.stop)
    handler.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
