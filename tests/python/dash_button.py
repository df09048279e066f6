"""A CCPDashButton simulated from its firmware, to judge the dash-button handler.

Written from the sketch itself, not from a description of the protocol: fdiniro/CCPDashButton,
``CCPDashButton/CCPDashButton.ino`` (commit 5bed00c; "ino:N" below is its line N) with the
defaults of ``CCPDashButton.h``, and the MQTT library it is built with, knolleary/pubsubclient
v2.7 (``src/PubSubClient.cpp``; "psc:N" below), the release of the sketch's time (2019; 2.8, with
a 256-byte buffer, came in 2020).

What matters to a handler, and is kept exactly:

- one press is one run of ``setup()`` (the button is the ESP32's reset button; the sketch has no
  ``loop()``); every global starts afresh, ``handlerStatus`` as ``StatusUnavailable`` (ino:330);
- MQTT messages are only read inside ``mqttClient.loop()``, at most one packet per call
  (psc:319-321), and SUBACK, PINGRESP and the button's own messages (it subscribes to the topic
  it publishes on) use up calls like any other packet;
- the waits: 30 x (loop, 100 ms) checking after every call until the status is no longer
  ``StatusUnavailable`` (ino:367-373); up to 5 rounds of 10 x (loop, 100 ms) for
  ``StatusProvisioning`` (ino:395-405); rounds of 10 x (loop, 100 ms) while the status is
  ``StatusProvisioning``, up to averageProvisioningTime + 120 rounds (ino:442-462) — the status is
  looked at only between rounds, so the last status message of a round is the one that counts;
- the button's messages: ``HH:MM:SS <id> GetStatus`` (ino:146-147) and, with the colons removed,
  ``HHMMSS <id> ProvisionCluster <id lower-cased>-HHMMSS`` (ino:157-170), cut to 49 characters
  (``char pubMsg[50]``, ino:47, 148, 171), published with QoS 0 (psc:380-400);
- what it can receive: ``sscanf("%s %s %s %s")`` into buffers of 10, 25, 25 and 50 bytes
  (ino:180-199) — a longer field overruns the stack, an empty message leaves all four buffers
  uninitialised — and whole packets of at most 128 bytes (psc:289-297; longer ones are dropped);
- once its connection is lost, ``loop()`` returns false and nothing reconnects it during the
  waits (psc:302-303, 365): ``MQTTReconnect()`` runs only before the first wait (ino:363-366).

What is left out, because no handler can see it: the Cisco logo and WiFi set-up before MQTT
(ino:341-347; about 1.6 s), NTP (the clock is this machine's, with the sketch's timeOffset), the
OLED drawing (only the text is kept), and the 5-30 s the last message stays on the display before
deep sleep (ino:126).

``time_scale`` multiplies every ``delay()``; it shortens the runs without changing their shape
(the rounds are still 10 loop() calls, one packet per call), and the handler under test is told
the same round length. The MQTT keepalive (15 s, psc:305) is not scaled: it is the broker's.
"""

import select
import socket
import struct
import threading
import time

# CCPDashButton.h:36-56, the sketch's defaults.
SKETCH_DEFAULTS = {
    "mqtt_topic": "DashButton",
    "mqtt_user": "mqttuser",
    "mqtt_password": "mqttpassword",
    "time_offset": 7200,
    "dash_button_id": "Dash01",
    "handler_id": "MyHandler",
    "average_provisioning_time": 160,
}

# What printMessageAndQuit() shows in the sketch's failure paths.
HANDLER_UNAVAILABLE = ["Handler", "unavailable"]  # ino:379
CANT_CONFIRM = ["Can't confirm", "provisioning", "request"]  # ino:410
TIMEOUT = ["Timeout"]  # ino:473
MQTT_FAILED = ["MQTT connection", "failed"]  # ino:355

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 0x10, 0x20, 0x30, 0x40, 0x80, 0x90
PINGREQ, PINGRESP, DISCONNECT = 0xC0, 0xD0, 0xE0


class PressAborted(Exception):
    """The button was pressed (reset) again while this run was going on."""


class _DeepSleep(Exception):
    def __init__(self, lines):
        super().__init__(lines)
        self.lines = lines


def _utf(s):
    b = s.encode()
    return struct.pack("!H", len(b)) + b


class PubSubClient:
    """The parts of PubSubClient v2.7 the sketch uses, on a plain TCP socket."""

    MAX_PACKET_SIZE = 128  # PubSubClient.h:26 (v2.7)
    KEEPALIVE = 15  # PubSubClient.h:31
    SOCKET_TIMEOUT = 15  # PubSubClient.h:36

    def __init__(self, host, port, callback, log):
        self.host, self.port = host, port
        self.callback = callback
        self.log = log
        self.sock = None
        self.next_msg_id = 0
        self.last_in = self.last_out = 0.0
        self.ping_outstanding = False

    # psc:120-219: CONNECT with a clean session and keepalive 15, then wait for CONNACK.
    def connect(self, client_id, user=None, password=None):
        if self.connected():
            return True
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.SOCKET_TIMEOUT)
        except OSError:
            self.sock = None
            return False
        flags = 0x02 | (0x80 if user is not None else 0) | (0x40 if user is not None and password is not None else 0)
        body = _utf("MQTT") + bytes([4, flags]) + struct.pack("!H", self.KEEPALIVE) + _utf(client_id)
        if user is not None:
            body += _utf(user)
            if password is not None:
                body += _utf(password)
        self.next_msg_id = 1
        self._write(CONNECT, body)
        self.last_in = self.last_out = time.monotonic()
        packet = self._read_packet()
        if packet and packet[0] & 0xF0 == CONNACK and len(packet) == 4 and packet[3] == 0:
            self.ping_outstanding = False
            return True
        self._stop()
        return False

    # psc:601-616: the socket says whether it is still connected; nothing reconnects it.
    def connected(self):
        if self.sock is None:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if readable and self.sock.recv(1, socket.MSG_PEEK) == b"":
                self._stop()
                return False
        except OSError:
            self._stop()
            return False
        return True

    # psc:534-556: SUBSCRIBE is written; its SUBACK is read later by loop() like any packet.
    def subscribe(self, topic, qos=0):
        if qos > 1 or not self.connected():
            return False
        self.next_msg_id = self.next_msg_id % 0xFFFF + 1
        return self._write(SUBSCRIBE | 0x02, struct.pack("!H", self.next_msg_id) + _utf(topic) + bytes([qos]))

    # psc:380-400: QoS 0, at most MAX_PACKET_SIZE bytes.
    def publish(self, topic, payload, retained=False):
        if not self.connected():
            return False
        if self.MAX_PACKET_SIZE < 5 + 2 + len(topic) + len(payload):
            return False
        return self._write(PUBLISH | (1 if retained else 0), _utf(topic) + payload)

    # psc:302-366: keepalive, then at most ONE packet per call.
    def loop(self):
        if not self.connected():
            return False
        t = time.monotonic()
        if t - self.last_in > self.KEEPALIVE or t - self.last_out > self.KEEPALIVE:
            if self.ping_outstanding:
                self._stop()
                return False
            self._raw(bytes([PINGREQ, 0]))
            self.last_in = self.last_out = t
            self.ping_outstanding = True
        readable, _, _ = select.select([self.sock], [], [], 0)
        if readable:
            packet = self._read_packet()
            if packet:
                self.last_in = t
                kind = packet[0] & 0xF0
                if kind == PUBLISH:
                    llen = self._length_bytes(packet)
                    tl = struct.unpack("!H", packet[1 + llen:3 + llen])[0]
                    topic = packet[3 + llen:3 + llen + tl].decode("utf-8", "replace")
                    rest = packet[3 + llen + tl:]
                    if packet[0] & 0x06 == 0x02:  # QoS 1: message id, then PUBACK after the callback
                        msg_id, payload = rest[:2], rest[2:]
                        self.callback(topic, payload)
                        self._raw(bytes([PUBACK, 2]) + msg_id)
                        self.last_out = t
                    else:
                        self.callback(topic, rest)
                elif kind == PINGREQ:
                    self._raw(bytes([PINGRESP, 0]))
                elif kind == PINGRESP:
                    self.ping_outstanding = False
                else:
                    self.log("loop(): read a %s packet" % {SUBACK: "SUBACK", PUBACK: "PUBACK"}.get(kind, hex(kind)))
            elif not self.connected():
                return False
        return True

    # psc:577-585
    def disconnect(self):
        if self.sock is not None:
            try:
                self._raw(bytes([DISCONNECT, 0]))
            except OSError:
                pass
            self._stop()

    def vanish(self):
        """A reset ESP32: its TCP connection is simply gone (sent as a reset here)."""
        if self.sock is not None:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self._stop()

    # -- the wire ---------------------------------------------------------------------------------

    @staticmethod
    def _length_bytes(packet):
        n = 1
        while packet[n] & 0x80:
            n += 1
        return n

    def _write(self, header, body):
        length, enc = len(body), b""
        while True:
            digit, length = length % 128, length // 128
            enc += bytes([digit | (0x80 if length else 0)])
            if not length:
                break
        ok = self._raw(bytes([header]) + enc + body)
        self.last_out = time.monotonic()
        return ok

    def _raw(self, data):
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self._stop()
            return False

    def _read_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))  # socket timeout: MQTT_SOCKET_TIMEOUT (psc:222-233)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _read_packet(self):
        """psc:246-300: one packet; one longer than the 128-byte buffer is read and dropped."""
        try:
            first = self._read_exact(1)
            enc, length, mult = b"", 0, 1
            while True:
                d = self._read_exact(1)
                enc += d
                length += (d[0] & 127) * mult
                mult *= 128
                if not d[0] & 128:
                    break
            packet = first + enc + self._read_exact(length)
        except (OSError, ConnectionError):
            self._stop()
            return None
        if len(packet) > self.MAX_PACKET_SIZE:
            self.log("loop(): dropped a %d-byte packet (buffer: %d bytes)" % (len(packet), self.MAX_PACKET_SIZE))
            return None
        return packet

    def _stop(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None


def sscanf_4s(text):
    """``sscanf(s, "%s %s %s %s", ...)``: up to four whitespace-separated words."""
    return text.split()[:4]


class Press:
    """One press of the button: one run of the sketch's setup() (ino:328-478)."""

    BUFFERS = (("first", 10), ("second", 25), ("third", 25), ("fourth", 50))  # ino:180-183

    def __init__(self, button):
        self.b = button
        self.aborted = threading.Event()
        self.trace = []  # what the button received and did, for failure messages
        self.faults = []  # things the real firmware would crash on
        self.sent = []  # what it published
        self.display = []  # what the OLED shows now
        self.result = None  # what it shows when it goes back to sleep
        # ino:45-51: the globals, fresh after every reset.
        self.handler_status = "StatusUnavailable"
        self.cluster_name = ""
        self.cluster_ip = ""
        self.current_progress_bar = 0
        self.mqtt = PubSubClient(button.host, button.port, self.call_back, self.trace.append)
        self._thread = None

    # -- the Arduino runtime ----------------------------------------------------------------------

    def delay(self, ms):
        if self.aborted.wait(ms / 1000.0 * self.b.time_scale):
            raise PressAborted()

    def formatted_time(self):
        # NTPClient::getFormattedTime(): HH:MM:SS of the epoch plus timeOffset.
        return time.strftime("%H:%M:%S", time.gmtime(time.time() + self.b.time_offset))

    def print_message_and_quit(self, lines):
        # ino:89-128: show the lines, disconnect, (wait,) deep sleep.
        self.display = list(lines)
        if self.mqtt.connected():
            self.mqtt.disconnect()
        raise _DeepSleep(list(lines))

    # -- the sketch ------------------------------------------------------------------------------

    def mqtt_setup(self):  # ino:239-270
        if self.mqtt.connected():
            return True
        for _ in range(3):
            if self.mqtt.connect(self.b.dash_id, self.b.mqtt_user, self.b.mqtt_password):
                if not self.mqtt.subscribe(self.b.topic, 1):
                    return False
                self.mqtt.loop()
                self.mqtt.loop()
                break
            self.delay(2000)
        return self.mqtt.connected()

    def mqtt_reconnect(self):  # ino:272-290, an endless loop on the real button
        deadline = time.monotonic() + self.b.give_up_after
        while not self.mqtt.connected():
            if time.monotonic() > deadline:
                raise AssertionError("the button would keep on trying to reconnect")
            if self.mqtt.connect(self.b.dash_id, self.b.mqtt_user, self.b.mqtt_password):
                self.mqtt.subscribe(self.b.topic)
                self.mqtt.loop()
                self.delay(100)
                self.mqtt.loop()
            else:
                self.delay(1000)

    def publish(self, message):
        message = message[:49]  # Message.toCharArray(pubMsg, 50)
        self.sent.append(message)
        return self.mqtt.publish(self.b.topic, message.encode())

    def check_status(self):  # ino:143-152
        return self.publish(self.formatted_time() + " " + self.b.dash_id + " GetStatus")

    def provision_cluster(self):  # ino:154-175
        stamp = self.formatted_time()
        stamp = stamp[:2] + stamp[3:]  # Message.remove(2, 1)
        stamp = stamp[:4] + stamp[5:]  # Message.remove(4, 1)
        self.cluster_name = (self.b.dash_id + "-" + stamp).lower()
        return self.publish(stamp + " " + self.b.dash_id + " ProvisionCluster " + self.cluster_name)

    def call_back(self, topic, message):  # ino:179-236
        text = message.decode("latin-1")
        self.trace.append("got %r" % text)
        words = sscanf_4s(text)
        if not words:
            self.faults.append("empty message %r: sscanf assigns nothing, the buffers hold stack garbage" % text)
            return
        for (name, size), word in zip(self.BUFFERS, words):
            if len(word) >= size:
                self.faults.append("%r: field %s is %d characters, char %s[%d] overflows the stack"
                                   % (text, name, len(word), name, size))
        fields = words + ["<uninitialised>"] * (4 - len(words))
        _, sender, command, argument = fields
        if sender == self.b.dash_id:
            return
        if sender == self.b.handler_id:
            if command == "StatusUnavailable":
                self.handler_status = "StatusUnavailable"
            if command == "StatusAvailable":
                self.handler_status = "StatusAvailable"
            if command == "StatusProvisioning":
                self.handler_status = "StatusProvisioning"
                self.cluster_name = argument
            if command == "StatusProvisioned":
                self.handler_status = "StatusProvisioned"
                self.cluster_ip = argument

    def progress_bar(self, stage):  # ino:309-325
        progress = stage % 100
        while self.current_progress_bar < progress:
            self.current_progress_bar += 1
            self.delay(10)

    def round_of_loops(self):
        # ino:399-403 and 450-454: the status is looked at only after ten of these.
        for _ in range(10):
            self.mqtt.loop()
            self.delay(100)
        self.trace.append("round ends with %s" % self.handler_status)

    def setup(self):  # ino:328-478
        self.handler_status = "StatusUnavailable"
        # (ino:333-350: display, Cisco logo, WiFi and NTP are not simulated.)
        if not self.mqtt_setup():
            self.print_message_and_quit(MQTT_FAILED)
        self.check_status()
        if not self.mqtt.connected():
            self.mqtt_reconnect()
        e = 0
        while e < 30 and self.handler_status == "StatusUnavailable":
            self.mqtt.loop()
            self.delay(100)
            e += 1
        if self.handler_status == "StatusUnavailable":
            self.print_message_and_quit(HANDLER_UNAVAILABLE)

        if self.handler_status == "StatusAvailable":
            self.display = ["Requesting", "K8s cluster"]
            self.progress_bar(5)
            self.provision_cluster()
            self.check_status()
            e = 0
            while self.handler_status != "StatusProvisioning" and e < 5:
                self.round_of_loops()
                e += 1
            if self.handler_status != "StatusProvisioning":
                self.print_message_and_quit(CANT_CONFIRM)

        self.display = ["Provisioning", self.cluster_name]
        progress = 10
        self.progress_bar(progress)
        self.check_status()
        avg = self.b.average_provisioning_time
        step_every = 1 if avg < 90 else avg // 90
        timeout = avg + 120
        counter = 0
        while self.handler_status == "StatusProvisioning" and counter < timeout:
            self.round_of_loops()
            progress = min(counter // step_every + 10, 100)
            self.progress_bar(progress)
            counter += 1

        if self.handler_status == "StatusProvisioned":
            self.print_message_and_quit([self.cluster_name, self.cluster_ip, "is ready."])
        self.print_message_and_quit(TIMEOUT)

    # -- running it ------------------------------------------------------------------------------

    def run(self):
        try:
            self.setup()
        except _DeepSleep as s:
            self.result = s.lines
        except PressAborted:
            self.result = None
            self.mqtt.vanish()
        except Exception as e:  # noqa: BLE001 - reported to the test
            self.result = ["simulator error: %r" % e]
            self.mqtt.vanish()
        return self

    def start(self):
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def reset(self):
        """The reset button pressed again: this run stops where it is, its connection vanishes."""
        self.aborted.set()
        if self._thread:
            self._thread.join(10)

    def join(self, timeout):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the button is still busy after %ss: %s" % (timeout, self.explain())
        return self.result

    def explain(self):
        return "display %r; sent %r; trace %r; faults %r" % (self.display, self.sent, self.trace[-40:], self.faults)


class DashButton:
    """A button with its configuration (CCPDashButton.h); ``press()`` runs setup() once."""

    def __init__(self, port, host="127.0.0.1", time_scale=1.0, **config):
        cfg = dict(SKETCH_DEFAULTS, **config)
        self.host, self.port = host, port
        self.time_scale = time_scale
        self.topic = cfg["mqtt_topic"]
        self.mqtt_user, self.mqtt_password = cfg["mqtt_user"], cfg["mqtt_password"]
        self.time_offset = cfg["time_offset"]
        self.dash_id = cfg["dash_button_id"]
        self.handler_id = cfg["handler_id"]
        self.average_provisioning_time = cfg["average_provisioning_time"]
        # The longest a run can take: the three waits and the progress bar, plus slack.
        self.give_up_after = (3 + 5 + self.average_provisioning_time + 120 + 10) * time_scale * 1.5 + 30

    @property
    def round_seconds(self):
        """How long one round of 10 x (loop(), delay(100)) lasts."""
        return self.time_scale

    def press(self):
        """Presses the button and returns the run when it is back in deep sleep."""
        p = Press(self).start()
        p.join(self.give_up_after)
        return p

    def start_press(self):
        return Press(self).start()
