"""A fake Tapo P100 plug on loopback that speaks KLAP v2, written from the protocol (not from
plugp100's code), counting every request that reaches it.

KLAP v2: handshake1 takes the client's 16-byte seed and answers the plug's seed plus
sha256(local + remote + auth_hash), auth_hash = sha256(sha1(user) + sha1(password)), with a
TP_SESSIONID cookie; handshake2 proves the client knows auth_hash; requests are AES-128-CBC with
key, IV and signature derived from both seeds and auth_hash, the IV's last four bytes replaced by
the sequence number, and a sha256 signature in front.
"""

import hashlib
import json
import secrets
import struct
import threading
import time
from urllib.parse import parse_qs, urlparse

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from loopback import LoopbackPostServer


def sha256(b):
    return hashlib.sha256(b).digest()


class Session:
    def __init__(self, local, remote, auth):
        self.local, self.remote, self.auth = local, remote, auth
        self.key = sha256(b"lsk" + local + remote + auth)[:16]
        iv = sha256(b"iv" + local + remote + auth)
        self.iv12 = iv[:12]
        self.sig = sha256(b"ldk" + local + remote + auth)[:28]
        self.confirmed = False

    def _iv(self, seq):
        return self.iv12 + struct.pack(">i", seq)

    def decrypt(self, body, seq):
        sig, ct = body[:32], body[32:]
        if sha256(self.sig + struct.pack(">i", seq) + ct) != sig:
            raise ValueError("bad signature")
        d = Cipher(algorithms.AES(self.key), modes.CBC(self._iv(seq))).decryptor()
        u = padding.PKCS7(128).unpadder()
        return u.update(d.update(ct) + d.finalize()) + u.finalize()

    def encrypt(self, data, seq):
        p = padding.PKCS7(128).padder()
        e = Cipher(algorithms.AES(self.key), modes.CBC(self._iv(seq))).encryptor()
        ct = e.update(p.update(data) + p.finalize()) + e.finalize()
        return sha256(self.sig + struct.pack(">i", seq) + ct) + ct


class FakeTapo(LoopbackPostServer):
    def __init__(self, user="lab@example.org", password="plug-secret"):
        self.user, self.password = user, password
        self.auth = sha256(hashlib.sha1(user.encode()).digest() + hashlib.sha1(password.encode()).digest())
        self.on = False
        self.mode = "ok"  # "ok", "silent" (never answers), "forbidden" (403)
        self.handshakes = 0
        self.requests = 0
        self.methods = []
        self.sessions = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        super().__init__()

    def stop(self):
        self.wake.set()
        super().stop()

    def set_mode(self, mode):
        self.mode = mode
        if mode != "silent":
            self.wake.set()
        else:
            self.wake.clear()

    def _cookie(self, h):
        for part in (h.headers.get("Cookie") or "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == "TP_SESSIONID":
                return v
        return None

    def _handle(self, h, body):
        if self.mode == "silent":
            # Hold the connection without an answer, as a plug that fell off the network would.
            self.wake.wait(30)
            h.close_connection = True
            return
        path = urlparse(h.path)
        with self.lock:
            if path.path.endswith("/handshake1"):
                self.handshakes += 1
                if self.mode == "forbidden":
                    return self._reply(h, 403)
                remote = secrets.token_bytes(16)
                sid = secrets.token_hex(16)
                self.sessions[sid] = Session(body[:16], remote, self.auth)
                return self._reply(h, 200, remote + sha256(body[:16] + remote + self.auth),
                                   [("Set-Cookie", "TP_SESSIONID=%s" % sid), ("Set-Cookie", "TIMEOUT=86400")])
            s = self.sessions.get(self._cookie(h))
            if path.path.endswith("/handshake2"):
                self.handshakes += 1
                if s is None or body != sha256(s.remote + s.local + s.auth):
                    return self._reply(h, 403)
                s.confirmed = True
                return self._reply(h, 200)
            if path.path.endswith("/request"):
                self.requests += 1
                if s is None or not s.confirmed:
                    return self._reply(h, 403)
                seq = int(parse_qs(path.query)["seq"][0])
                req = json.loads(s.decrypt(body, seq))
                method = req.get("method")
                self.methods.append(method)
                if method == "get_device_info":
                    result = {"device_id": "fake-p100", "model": "P100", "type": "SMART.TAPOPLUG",
                              "device_on": self.on, "nickname": "ZmFrZQ=="}
                elif method == "set_device_info":
                    self.on = bool(req["params"]["device_on"])
                    result = {}
                else:
                    return self._reply(h, 200, s.encrypt(json.dumps({"error_code": -1002}).encode(), seq))
                out = json.dumps({"error_code": 0, "result": result}).encode()
                return self._reply(h, 200, s.encrypt(out, seq))
            return self._reply(h, 404)


if __name__ == "__main__":
    p = FakeTapo().start()
    print("fake Tapo plug on", p.host)
    while True:
        time.sleep(60)
