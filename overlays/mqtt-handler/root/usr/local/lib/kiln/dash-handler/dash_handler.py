#!/usr/bin/python3
"""kiln's handler for the CCPDashButton: answers ESP32 dash buttons over MQTT and provisions a
cluster when an authorised button asks for one.

The wire protocol is the firmware's (fdiniro/CCPDashButton, CCPDashButton/CCPDashButton.ino; "ino:N"
is its line N), on one topic (default ``DashButton``), one message ``<time> <sender> <verb>
[<argument>]`` each:

- a button sends ``HH:MM:SS Dash01 GetStatus`` (ino:146-147) and, with the colons removed,
  ``234717 Dash01 ProvisionCluster dash01-234717`` (ino:157-170), cut to 49 characters (ino:47);
- the handler answers ``StatusAvailable``, ``StatusProvisioning <name>``, ``StatusProvisioned
  <master-ip>`` and, going away, ``StatusUnavailable``.

What the firmware needs from a handler, beyond the words:

- the button splits a message with ``sscanf("%s %s %s %s")`` into 10, 25, 25 and 50-byte buffers
  (ino:180-199), and PubSubClient 2.7 drops packets over 128 bytes: every field sent must fit, so
  the handler ID has at most 24 characters, an argument at most 49, and the configuration is
  refused when the longest answer would not fit;
- the button reads one message per ``loop()`` call and looks at the last status only after a
  round of 10 x (loop, 100 ms) (ino:396-405, 447-462). So no other status may follow
  ``StatusProvisioned`` within a round (the button would show "Timeout"), and
  ``StatusProvisioned`` may not share the confirmation round with ``StatusProvisioning`` (the
  button would show "Can't confirm"): the handler keeps 1.5 rounds (``button_round_seconds``)
  around it, delaying answers to later requests, which the button waits 3 s for (ino:367-373);
- nothing is published retained: a retained status reaches every button that is waiting, and a
  stale one reaches the next button to subscribe (ino:258-259) before its own answer does.

Unlike the bash loop it replaces: buttons must be on an allow-list, the provisioning command is an
argv list run without a shell (with the validated cluster name in place of ``{cluster}``, or as its
last argument), one provisioning runs at a time, a failing or hanging command returns the handler
to available, a last will ``StatusUnavailable`` tells waiting buttons that the handler died,
reconnects back off, and SIGTERM stops it cleanly. Runs on any Python 3.7+ with paho-mqtt 1.x or 2.x.
"""

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt

# What a button sends is at most 49 characters (ino:47, 148, 171).
MAX_INCOMING = 49
# The first field is HH:MM:SS in GetStatus and HHMMSS in ProvisionCluster; the bash handler this
# replaces never looked at it.
MESSAGE_RE = re.compile(
    r"^(\d{2}:\d{2}:\d{2}|\d{6}) ([A-Za-z0-9_-]{1,24}) ([A-Za-z]{1,24})(?: (\S{1,49}))?$")
# The button's char second[25], third[25] and fourth[50] (ino:181-183).
MAX_SENDER = 24
MAX_ARGUMENT = 49
# PubSubClient 2.7's MQTT_MAX_PACKET_SIZE: longer packets never reach the callback.
MAX_PACKET = 128
# "HHMMSS <id> ProvisionCluster <id>-HHMMSS" fits the 49 characters for ids of up to 8.
MAX_DASH_ID = 8
ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
PLACEHOLDER = "{cluster}"

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
    # The firmware's own defaults (CCPDashButton.h: handlerID "MyHandler", dashButtonID "Dash01").
    "handler_id": "MyHandler",
    "allowed_dash_ids": [],
    "provision_command": [],
    "timeout": 900,
    # Matches cluster_creator.py's "Master IP: 1.2.3.4" as well as MASTER_IP=1.2.3.4.
    "master_ip_pattern": r"(?i)\bmaster[ _-]?ip\s*[=:]\s*(\d{1,3}(?:\.\d{1,3}){3})\b",
    # The button's round: 10 x (mqttClient.loop(), delay(100)).
    "button_round_seconds": 1.0,
    "reconnect_min_delay": 1,
    "reconnect_max_delay": 60,
}


class ConfigError(Exception):
    pass


def longest_packet(topic, handler_id):
    """Bytes of the longest answer as an MQTT packet (QoS 1): fixed header, topic, id, payload."""
    payload = len("00:00:00 %s StatusProvisioning " % handler_id) + MAX_ARGUMENT
    remaining = 2 + len(topic.encode()) + 2 + payload
    return 1 + (1 if remaining < 128 else 2) + remaining


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
    check_ids(cfg)
    topic = cfg["topic"]
    if not isinstance(topic, str) or not topic or set(topic) & set("+#\0"):
        raise ConfigError("topic must be a plain MQTT topic name (no wildcards), as the button's mqtt_topic")
    if longest_packet(topic, cfg["handler_id"]) > MAX_PACKET:
        raise ConfigError(
            "topic %r and handler_id %r are too long together: the longest answer would be %d bytes on "
            "the wire, and the button's MQTT library (PubSubClient 2.7) drops packets over %d"
            % (topic, cfg["handler_id"], longest_packet(topic, cfg["handler_id"]), MAX_PACKET))
    cmd = cfg["provision_command"]
    if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
        raise ConfigError("provision_command must be a non-empty list of strings (argv, no shell)")
    try:
        cfg["button_round_seconds"] = float(cfg["button_round_seconds"])
        cfg["timeout"] = float(cfg["timeout"])
    except (TypeError, ValueError):
        raise ConfigError("timeout and button_round_seconds must be numbers of seconds")
    if cfg["button_round_seconds"] <= 0 or cfg["timeout"] <= 0:
        raise ConfigError("timeout and button_round_seconds must be positive")
    try:
        cfg["_ip_re"] = re.compile(cfg["master_ip_pattern"])
    except (re.error, TypeError) as e:
        raise ConfigError("master_ip_pattern: %s" % e)
    if cfg["_ip_re"].groups < 1:
        raise ConfigError("master_ip_pattern needs a group that captures the IP")
    return cfg


def check_ids(cfg):
    hid = cfg["handler_id"]
    if not isinstance(hid, str) or not ID_RE.match(hid) or len(hid) > MAX_SENDER:
        raise ConfigError(
            "handler_id must be 1-%d letters, digits, '-' or '_' (the button reads the sender into a "
            "25-byte buffer) and equal the button's handlerID (the sketch's default is MyHandler)" % MAX_SENDER)
    ids = cfg["allowed_dash_ids"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ConfigError("allowed_dash_ids must be a list of the buttons' dashButtonID strings")
    for dash_id in ids:
        if not ID_RE.match(dash_id) or len(dash_id) > MAX_DASH_ID:
            raise ConfigError(
                "allowed dash id %r: use 1-%d letters, digits, '-' or '_'; the button cuts its messages at 49 "
                "characters, so 'HHMMSS <id> ProvisionCluster <id>-HHMMSS' only fits for ids of up to %d"
                % (dash_id, MAX_DASH_ID, MAX_DASH_ID))
        if dash_id == hid:
            raise ConfigError("dash id %r is also the handler_id: the button would ignore the handler" % dash_id)


def parse_message(payload):
    """(time, sender, verb, argument) or None for anything malformed or too long."""
    try:
        text = payload.decode("ascii")
    except (UnicodeDecodeError, AttributeError):
        return None
    if len(text) > MAX_INCOMING:
        return None
    m = MESSAGE_RE.match(text)
    return m.groups() if m else None


class Handler:
    def __init__(self, cfg, client_factory=mqtt.Client):
        self.cfg = cfg
        # Held while the state is read or changed and the matching status published, so that the
        # buttons receive statuses in the order the state went through them.
        self.lock = threading.Lock()
        self.provisioning = None  # the cluster name while a provisioning runs
        self.started = 0.0  # when its StatusProvisioning went out (monotonic)
        self.quiet_until = 0.0  # no status but StatusProvisioned before this (monotonic)
        self.proc = None
        self.stopping = threading.Event()
        self.client = self._make_client(client_factory)

    @property
    def settle(self):
        """1.5 of the button's rounds: what keeps two statuses out of one round."""
        return 1.5 * self.cfg["button_round_seconds"]

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
        # Not retained: it is for the buttons waiting now, not for the next one to subscribe.
        client.will_set(self.cfg["topic"], self._message("StatusUnavailable"), qos=1, retain=False)
        client.reconnect_delay_set(self.cfg["reconnect_min_delay"], self.cfg["reconnect_max_delay"])
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _message(self, verb, argument=None):
        text = "%s %s %s" % (time.strftime("%H:%M:%S"), self.cfg["handler_id"], verb)
        if argument:
            if len(argument) > MAX_ARGUMENT or not re.match(r"^\S+$", argument):
                raise ValueError("argument %r does not fit the button's 50-byte buffer" % argument)
            text += " " + argument
        return text

    def publish(self, verb, argument=None):
        text = self._message(verb, argument)
        log.info("-> %s", text)
        self.client.publish(self.cfg["topic"], text, qos=1, retain=False)

    def _on_connect(self, client, userdata, flags, rc):
        if rc != 0:
            log.error("broker refused the connection (rc=%s)", rc)
            return
        log.info("connected to %s:%s", self.cfg["broker"]["host"], self.cfg["broker"]["port"])
        # Buttons ask (GetStatus) and wait for the answer: nothing to announce.
        client.subscribe(self.cfg["topic"], qos=1)

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
            self.answer_status()
        elif verb == "ProvisionCluster":
            if not self.valid_name(sender, argument):
                log.warning("ignoring ProvisionCluster with invalid cluster name %r from %s", argument, sender)
                return
            self.provision(argument)
        else:
            log.warning("ignoring unknown verb %r from %s", verb, sender)

    @staticmethod
    def valid_name(sender, name):
        # ino:166-167: the lower-cased button id, '-', and the button's HHMMSS.
        return bool(name) and re.match(r"^%s-\d{6}$" % re.escape(sender.lower()), name) is not None

    def _later(self, delay, fn, *args):
        def run():
            if not self.stopping.is_set():
                try:
                    fn(*args)
                except Exception:
                    log.exception("error in a delayed answer")

        timer = threading.Timer(delay, run)
        timer.daemon = True
        timer.start()

    def answer_status(self):
        with self.lock:
            wait = self.quiet_until - time.monotonic()
            if wait <= 0:
                if self.provisioning:
                    self.publish("StatusProvisioning", self.provisioning)
                else:
                    self.publish("StatusAvailable")
                return
        # A button may still be in the round in which it got StatusProvisioned.
        self._later(wait, self.answer_status)

    def provision(self, name):
        with self.lock:
            wait = self.quiet_until - time.monotonic()
            if wait <= 0:
                if self.provisioning:
                    # A press during provisioning (or a second button) follows the running one.
                    self.publish("StatusProvisioning", self.provisioning)
                    return
                self.provisioning = name
                self.started = time.monotonic()
                self.publish("StatusProvisioning", name)
        if wait > 0:
            self._later(wait, self.provision, name)
            return
        threading.Thread(target=self._run, args=(name,), daemon=True).start()

    def argv(self, name):
        cmd = self.cfg["provision_command"]
        if any(PLACEHOLDER in a for a in cmd):
            return [a.replace(PLACEHOLDER, name) for a in cmd]
        return list(cmd) + [name]

    def _run(self, name):
        ip = self.run_command(name)
        hold = self.started + self.settle - time.monotonic()
        if hold > 0:
            self.stopping.wait(hold)
        with self.lock:
            self.provisioning = None
            if ip:
                self.publish("StatusProvisioned", ip)
                self.quiet_until = time.monotonic() + self.settle
            else:
                # Buttons waiting for this one leave their loop now rather than after their timeout.
                self.publish("StatusAvailable")

    def run_command(self, name):
        """Runs the provisioning command; the master IP it printed, or None."""
        argv = self.argv(name)
        log.info("provisioning %s: %s", name, argv)
        try:
            # Its own process group, so that a timeout stops whatever it started too.
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            log.error("cannot run the provisioning command: %s", e)
            return None
        self.proc = proc
        try:
            out, _ = proc.communicate(timeout=self.cfg["timeout"])
        except subprocess.TimeoutExpired:
            self._kill(proc)
            proc.wait()
            proc.stdout.close()
            log.error("provisioning %s timed out after %ss; killed", name, self.cfg["timeout"])
            return None
        finally:
            self.proc = None
        output = out.decode("utf-8", "replace")
        if proc.returncode != 0:
            log.error("provisioning %s failed (exit %s): %s", name, proc.returncode, output[-2000:])
            return None
        m = self.cfg["_ip_re"].search(output)
        if not m or len(m.group(1)) > MAX_ARGUMENT or not re.match(r"^\S+$", m.group(1)):
            log.error("provisioning %s finished but printed no master IP matching %s",
                      name, self.cfg["master_ip_pattern"])
            return None
        log.info("provisioned %s: master IP %s", name, m.group(1))
        return m.group(1)

    @staticmethod
    def _kill(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()

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
        proc = self.proc
        if proc is not None:
            log.info("stopping the running provisioning")
            self._kill(proc)
        # A clean stop tells the buttons waiting now that no handler is listening.
        info = self.client.publish(self.cfg["topic"], self._message("StatusUnavailable"), qos=1, retain=False)
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
