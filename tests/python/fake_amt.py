"""A fake Intel AMT WS-Management endpoint on loopback: HTTP digest authentication (RFC 7616,
MD5, qop=auth, as AMT does it) and SOAP 1.2 envelopes for the calls a power driver makes —
Enumerate/Pull of CIM_AssociatedPowerManagementService, RequestPowerStateChange, ChangeBootOrder,
SetBootConfigRole. Every authenticated call is recorded as (method, details), details with the
time it came ("at").

Power as a machine with an operating system has it: a graceful off (12) only starts the OS's
shutdown, and AMT goes on reporting 2 (on) until ``shutdown_delay`` seconds later; with
``shutdown_delay=None`` the OS never shuts down. Hard off (8), on (2) and resets act at once."""

import hashlib
import secrets
import threading
import time
import xml.etree.ElementTree as ET

from loopback import LoopbackPostServer

REALM = "Digest:0A8E0000000000000000000000000000"


def md5(s):
    return hashlib.md5(s.encode()).hexdigest()


def local(tag):
    return tag.rsplit("}", 1)[-1]


class FakeAmt(LoopbackPostServer):
    def __init__(self, user="admin", password="Amt-Passw0rd!", shutdown_delay=0.0):
        self.user, self.password = user, password
        self.power_state = 8  # off
        self.shutdown_delay = shutdown_delay
        self.off_at = None  # when the machine last went off
        self._shutdown = None
        self.calls = []
        self.nonces = set()
        self.lock = threading.Lock()
        super().__init__()

    def _set_power(self, state):
        """Under self.lock."""
        if self._shutdown is not None:
            self._shutdown.cancel()
            self._shutdown = None
        if state == 8 and self.power_state != 8:
            self.off_at = time.time()
        self.power_state = state

    def _os_shut_down(self, token):
        with self.lock:
            if self._shutdown is token:  # not cancelled meanwhile
                self._shutdown = None
                self._set_power(8)

    def actions(self):
        with self.lock:
            return [c[0] for c in self.calls]

    def _authorised(self, h):
        auth = h.headers.get("Authorization") or ""
        if not auth.startswith("Digest "):
            return False
        fields = {}
        for part in auth[7:].split(","):
            k, _, v = part.strip().partition("=")
            fields[k] = v.strip('"')
        if fields.get("username") != self.user or fields.get("nonce") not in self.nonces:
            return False
        ha1 = md5("%s:%s:%s" % (self.user, REALM, self.password))
        ha2 = md5("POST:%s" % fields.get("uri"))
        want = md5(":".join([ha1, fields["nonce"], fields.get("nc", ""), fields.get("cnonce", ""),
                             fields.get("qop", ""), ha2]))
        return secrets.compare_digest(want, fields.get("response", ""))

    def _soap(self, body):
        return ('<?xml version="1.0" encoding="UTF-8"?><a:Envelope '
                'xmlns:a="http://www.w3.org/2003/05/soap-envelope"><a:Header/>'
                "<a:Body>%s</a:Body></a:Envelope>" % body).encode()

    def _handle(self, h, body):
        if not self._authorised(h):
            nonce = secrets.token_hex(16)
            self.nonces.add(nonce)
            return self._reply(h, 401, b"", [(
                "WWW-Authenticate",
                'Digest realm="%s", nonce="%s", stale="false", qop="auth"' % (REALM, nonce))])
        env = ET.fromstring(body)
        action = resource = None
        values = {}
        header, body_el = list(env)[0], list(env)[1]
        for el in header.iter():
            if local(el.tag) == "Action":
                action = el.text
            elif local(el.tag) == "ResourceURI":
                resource = el.text
        # The call's arguments: leaf elements of the body; a selector by its Name.
        for el in body_el.iter():
            if el.text and el.text.strip() and len(list(el)) == 0:
                name = el.get("Name") if local(el.tag) == "Selector" else local(el.tag)
                values.setdefault(name, el.text.strip())
        op = action.rsplit("/", 1)[-1]
        cls = resource.rsplit("/", 1)[-1]
        with self.lock:
            self.calls.append((op, {"class": cls, "at": time.time(), **values}))
            if op == "Enumerate":
                out = ('<g:EnumerateResponse xmlns:g="http://schemas.xmlsoap.org/ws/2004/09/enumeration">'
                       "<g:EnumerationContext>ctx-%s</g:EnumerationContext></g:EnumerateResponse>"
                       % secrets.token_hex(4))
            elif op == "Pull":
                out = ('<g:PullResponse xmlns:g="http://schemas.xmlsoap.org/ws/2004/09/enumeration">'
                       '<g:Items><h:CIM_AssociatedPowerManagementService xmlns:h="%s">'
                       "<h:PowerState>%d</h:PowerState></h:CIM_AssociatedPowerManagementService>"
                       "</g:Items><g:EndOfSequence/></g:PullResponse>" % (resource, self.power_state))
            elif op == "RequestPowerStateChange":
                state = int(values["PowerState"])
                if state == 12:
                    if self.power_state == 2 and self._shutdown is None and self.shutdown_delay is not None:
                        timer = threading.Timer(self.shutdown_delay, lambda: self._os_shut_down(timer))
                        timer.daemon = True
                        self._shutdown = timer
                        timer.start()
                else:
                    self._set_power(2 if state in (2, 5, 10) else 8)
                out = '<g:RequestPowerStateChange_OUTPUT xmlns:g="%s"><g:ReturnValue>0</g:ReturnValue></g:RequestPowerStateChange_OUTPUT>' % resource
            elif op in ("ChangeBootOrder", "SetBootConfigRole"):
                out = '<g:%s_OUTPUT xmlns:g="%s"><g:ReturnValue>0</g:ReturnValue></g:%s_OUTPUT>' % (op, resource, op)
            else:
                return self._reply(h, 400)
        self._reply(h, 200, self._soap(out), [("Content-Type", "application/soap+xml; charset=UTF-8")])
