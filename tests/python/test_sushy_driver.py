"""kiln's sushy-tools power driver in the real sushy-tools emulator, driven by sushy (the library
Ironic's Redfish driver uses), against a fake Tapo plug that speaks KLAP (plugp100 itself talks to
it, see test_plugp100_talks_to_the_fake_plug) and a fake Intel AMT WS-Management endpoint."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

def _require(name):
    # CI (KILN_REQUIRE_TOOLS=1) must not pass by skipping: a missing peer is a failure there.
    if os.environ.get("KILN_REQUIRE_TOOLS") == "1":
        return __import__(name)
    return pytest.importorskip(name)


sushy = _require("sushy")
_require("sushy_tools")
_require("plugp100")

sys.path.insert(0, str(Path(__file__).parent))
from fake_amt import FakeAmt  # noqa: E402
from fake_tapo import FakeTapo  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "overlays/sushy-baremetal/root/usr/local/lib/kiln/sushy-baremetal/kiln-sushy-emulator"
TAPO_UUID = "6a4f6a0e-1b7c-4c3e-9a53-000000000001"
AMT_UUID = "6a4f6a0e-1b7c-4c3e-9a53-000000000004"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    def __init__(self, tmp, plug, amt, interval=30, timeout=3, shutdown_poll=0.2, shutdown_timeout=30):
        self.tmp = tmp
        self.port = free_port()
        (tmp / "tapo.credentials").write_text("%s\n%s\n" % (plug.user, plug.password))
        (tmp / "amt.password").write_text(amt.password + "\n")
        self.conf = tmp / "sushy.conf"
        systems = [
            {"name": "edge-1", "uuid": TAPO_UUID,
             "power": {"type": "tapo", "host": plug.host,
                       "credentials_file": str(tmp / "tapo.credentials"), "timeout": timeout}},
            {"name": "edge-4", "uuid": AMT_UUID,
             "power": {"type": "amt", "host": amt.host, "user": amt.user,
                       "password_file": str(tmp / "amt.password"), "timeout": timeout}},
        ]
        # The emulator's own htpasswd (bcrypt), as Metal3's BMC credentials are checked.
        import bcrypt
        (tmp / "htpasswd").write_text("metal3:%s\n" % bcrypt.hashpw(b"bmc-secret", bcrypt.gensalt(4)).decode())
        self.conf.write_text(
            "KILN_SYSTEMS = %s\nKILN_POWER_POLL_INTERVAL = %r\nKILN_RESTART_DELAY = 0.2\n"
            "KILN_SHUTDOWN_POLL_INTERVAL = %r\nKILN_SHUTDOWN_TIMEOUT = %r\n"
            "KILN_STATE_FILE = %r\nSUSHY_EMULATOR_AUTH_FILE = %r\n"
            % (json.dumps(systems), interval, shutdown_poll, shutdown_timeout, str(tmp / "state.json"),
               str(tmp / "htpasswd")))
        self.log = tmp / "emulator.log"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), "--config", str(self.conf), "-i", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("emulator died:\n" + self.log.read_text())
                time.sleep(0.05)
        return self

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self, retries=10):
        # Ironic's way in: basic auth with the credentials of the BareMetalHost's secret. sushy
        # retries 5xx answers ten times, 3 s apart; the error tests look at the first answer.
        return sushy.Sushy("http://127.0.0.1:%d/redfish/v1" % self.port,
                           auth=sushy.auth.BasicAuth("metal3", "bmc-secret"),
                           server_side_retries=retries)

    def system(self, uuid, retries=10):
        return self.client(retries).get_system("/redfish/v1/Systems/%s" % uuid)


@pytest.fixture
def lab(tmp_path):
    plug = FakeTapo().start()
    amt = FakeAmt().start()
    emulators = []

    def make(**kw):
        e = Emulator(tmp_path, plug, amt, **kw).start()
        emulators.append(e)
        return e

    yield plug, amt, make
    for e in emulators:
        e.stop()
    plug.stop()
    amt.stop()


def wait_for(fn, timeout=15):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - waiting through errors is the point
            last = e
        time.sleep(0.1)
    raise AssertionError("timed out; last error: %r" % (last,))


def test_plugp100_talks_to_the_fake_plug():
    from plugp100.api.protocol.klap import klap_handshake_v2
    from plugp100.api.protocol.klap.klap_protocol import KlapProtocol
    from plugp100.api.requests.tapo_request import TapoRequest
    from plugp100.api.tapo_client import TapoClient
    from plugp100.common.credentials import AuthCredential

    plug = FakeTapo().start()
    try:
        async def talk():
            creds = AuthCredential(plug.user, plug.password)
            url = "http://%s/app" % plug.host
            c = TapoClient(creds, url, protocol=KlapProtocol(creds, url, klap_handshake_v2()))
            try:
                await c.execute_raw_request(TapoRequest.set_device_info({"device_on": True}))
                return (await c.execute_raw_request(TapoRequest.get_device_info())).get()
            finally:
                await c.close()

        info = asyncio.run(talk())
        assert info["device_on"] is True and plug.on is True
        assert plug.methods == ["set_device_info", "get_device_info"]
    finally:
        plug.stop()


def test_systems_power_and_boot_overrides_reach_the_backends(lab):
    plug, amt, make = lab
    emu = make()
    members = {m.name: m.identity for m in emu.client().get_system_collection().get_members()}
    assert members == {"edge-1": TAPO_UUID, "edge-4": AMT_UUID}

    # Power state comes from the poller's first read.
    tapo = wait_for(lambda: emu.system(TAPO_UUID))
    assert wait_for(lambda: emu.system(TAPO_UUID).power_state) == sushy.POWER_STATE_OFF
    assert wait_for(lambda: emu.system(AMT_UUID).power_state) == sushy.POWER_STATE_OFF
    # A system is reachable by name too (Metal3's bmc.address names it).
    assert emu.system("edge-1").uuid == TAPO_UUID
    # Without the BMC credentials, nothing.
    anonymous = sushy.Sushy("http://127.0.0.1:%d/redfish/v1" % emu.port,
                            auth=sushy.auth.BasicAuth("metal3", "wrong"))
    with pytest.raises(sushy.exceptions.AccessError):
        anonymous.get_system("/redfish/v1/Systems/%s" % TAPO_UUID)

    tapo.reset_system(sushy.RESET_ON)
    assert plug.on is True
    assert emu.system(TAPO_UUID).power_state == sushy.POWER_STATE_ON
    tapo.reset_system(sushy.RESET_FORCE_OFF)
    assert plug.on is False
    assert emu.system(TAPO_UUID).power_state == sushy.POWER_STATE_OFF
    before = list(plug.methods)
    tapo.reset_system(sushy.RESET_FORCE_RESTART)
    assert plug.methods[len(before):] == ["set_device_info", "set_device_info"]
    assert plug.on is True

    # AMT: a one-time PXE override, then power on — the boot order goes to AMT first.
    amt_sys = emu.system(AMT_UUID)
    amt_sys.set_system_boot_options(sushy.BOOT_SOURCE_TARGET_PXE,
                                    enabled=sushy.BOOT_SOURCE_ENABLED_ONCE,
                                    mode=sushy.BOOT_SOURCE_MODE_UEFI)
    amt_sys = emu.system(AMT_UUID)
    assert amt_sys.boot.target == sushy.BOOT_SOURCE_TARGET_PXE
    assert amt_sys.boot.enabled == sushy.BOOT_SOURCE_ENABLED_ONCE
    assert amt_sys.boot.mode == sushy.BOOT_SOURCE_MODE_UEFI
    # Stored persistently: a restarted emulator still knows it.
    emu.stop()
    emu = make()
    amt_sys = emu.system(AMT_UUID)
    assert amt_sys.boot.enabled == sushy.BOOT_SOURCE_ENABLED_ONCE

    n = len(amt.calls)
    amt_sys.reset_system(sushy.RESET_ON)
    new = [c for c in amt.calls[n:] if c[0] not in ("Enumerate", "Pull")]
    assert [c[0] for c in new] == ["ChangeBootOrder", "SetBootConfigRole", "RequestPowerStateChange"]
    assert new[0][1]["InstanceID"] == "Intel(r) AMT: Force PXE Boot"
    assert new[1][1]["Role"] == "1"
    assert new[2][1]["PowerState"] == "2"
    assert amt.power_state == 2
    assert emu.system(AMT_UUID).power_state == sushy.POWER_STATE_ON
    # Once means once: consumed by the boot it applied to.
    assert emu.system(AMT_UUID).boot.enabled == sushy.BOOT_SOURCE_ENABLED_DISABLED

    n = len(amt.calls)
    emu.system(AMT_UUID).reset_system(sushy.RESET_FORCE_OFF)
    offs = [c for c in amt.calls[n:] if c[0] == "RequestPowerStateChange"]
    assert [c[1]["PowerState"] for c in offs] == ["8"]
    n = len(amt.calls)
    emu.system(AMT_UUID).reset_system(sushy.RESET_GRACEFUL_SHUTDOWN)
    offs = [c for c in amt.calls[n:] if c[0] == "RequestPowerStateChange"]
    assert [c[1]["PowerState"] for c in offs] == ["12"]
    # A graceful restart is a graceful off, a pause, and on (the waiting is tested below).
    n = len(amt.calls)
    emu.system(AMT_UUID).reset_system(sushy.RESET_GRACEFUL_RESTART)

    def steps():
        return [c[1]["PowerState"] for c in amt.calls[n:] if c[0] == "RequestPowerStateChange"]

    assert wait_for(lambda: steps() == ["12", "2"] and amt.power_state == 2, timeout=5)
    # (The restart finishes on the poller's thread: On is recorded once AMT has answered.)
    wait_for(lambda: emu.system(AMT_UUID).power_state == sushy.POWER_STATE_ON, timeout=5)


def test_polling_ten_times_a_second_for_a_minute_barely_reaches_the_plug(lab):
    plug, amt, make = lab
    interval = 10
    emu = make(interval=interval)
    client = emu.client()
    system = wait_for(lambda: client.get_system("/redfish/v1/Systems/%s" % TAPO_UUID))
    wait_for(lambda: emu.system(TAPO_UUID).power_state)
    start_requests = plug.requests
    resets = 0
    t0 = time.time()
    reads = 0
    while time.time() - t0 < 60:
        system.refresh()
        assert system.power_state in (sushy.POWER_STATE_ON, sushy.POWER_STATE_OFF)
        reads += 1
        if reads in (200, 400):
            # A plug's graceful shutdown cuts the power at once: no faster polling follows.
            system.reset_system(sushy.RESET_ON if reads == 200 else sushy.RESET_GRACEFUL_SHUTDOWN)
            resets += 1
        time.sleep(0.1)
    used = plug.requests - start_requests
    allowed = 60 // interval + 1 + resets
    print("emulator reads: %d, plug requests: %d (allowed %d), handshakes: %d"
          % (reads, used, allowed, plug.handshakes))
    assert reads > 400
    assert used <= allowed
    assert plug.handshakes == 2, "one KLAP session for the whole run"


def ironic_waits_for(emu, uuid, state, timeout):
    """What Ironic does after a reset (conductor utils node_wait_for_power_state): read the power
    state until it is the one asked for. Returns every read as (time, state)."""
    reads, deadline = [], time.time() + timeout
    while time.time() < deadline:
        got = emu.system(uuid).power_state
        reads.append((time.time(), got))  # when the answer was in
        if reads[-1][1] == state:
            return reads
        time.sleep(0.1)
    raise AssertionError("still %s after %ss" % (reads[-1][1], timeout))


def test_a_graceful_shutdown_reads_on_until_amt_reports_the_machine_off(lab):
    plug, amt, make = lab
    amt.shutdown_delay = 2.0  # the operating system takes 2 s to shut down
    emu = make(shutdown_poll=0.3)
    system = wait_for(lambda: emu.system(AMT_UUID))
    system.reset_system(sushy.RESET_ON)
    asked = time.time()
    emu.system(AMT_UUID).reset_system(sushy.RESET_GRACEFUL_SHUTDOWN)
    reads = ironic_waits_for(emu, AMT_UUID, sushy.POWER_STATE_OFF, timeout=10)
    off = amt.off_at
    assert off is not None, "read Off while the machine was still shutting down: %r" % reads
    assert off - asked >= 2.0
    # Every answer before the machine was off said On; Off came within a poll interval after.
    before = [st for at, st in reads if at < off]
    assert len(before) > 10 and set(before) == {sushy.POWER_STATE_ON}, reads
    assert off <= reads[-1][0] < off + 0.3 + 0.5
    # The faster polling stops once the machine is off: back to one read per interval (30 s).
    n = len(amt.calls)
    time.sleep(1)
    assert amt.calls[n:] == []


def test_a_graceful_restart_powers_on_only_after_the_machine_is_off(lab):
    plug, amt, make = lab
    amt.shutdown_delay = 1.5
    emu = make(shutdown_poll=0.2)
    system = wait_for(lambda: emu.system(AMT_UUID))
    system.reset_system(sushy.RESET_ON)
    system.set_system_boot_options(sushy.BOOT_SOURCE_TARGET_PXE, enabled=sushy.BOOT_SOURCE_ENABLED_ONCE)
    n = len(amt.calls)
    emu.system(AMT_UUID).reset_system(sushy.RESET_GRACEFUL_RESTART)
    # (A power-on while the OS is still shutting down would leave the machine off at the end.)
    wait_for(lambda: amt.off_at, timeout=10)
    wait_for(lambda: amt.power_state == 2, timeout=5)
    calls = [c for c in amt.calls[n:] if c[0] not in ("Enumerate", "Pull")]
    assert [c[0] for c in calls] == ["RequestPowerStateChange", "ChangeBootOrder", "SetBootConfigRole",
                                     "RequestPowerStateChange"], calls
    assert calls[0][1]["PowerState"] == "12" and calls[-1][1]["PowerState"] == "2"
    # The PXE override and the power-on come after the OS was done, and the restart pause.
    assert calls[1][1]["at"] >= amt.off_at + 0.2
    # The driver records On once AMT has answered the power-on; the fake AMT turns on when the
    # request arrives, a moment earlier, so the emulator is asked until it says so (as Ironic
    # polls), within a few poll intervals.
    wait_for(lambda: emu.system(AMT_UUID).power_state == sushy.POWER_STATE_ON, timeout=5)


def test_a_graceful_shutdown_that_never_ends_becomes_a_redfish_error(lab):
    plug, amt, make = lab
    amt.shutdown_delay = None  # an OS that ignores the ACPI power button
    emu = make(shutdown_poll=0.2, shutdown_timeout=1.5)
    system = wait_for(lambda: emu.system(AMT_UUID))
    system.reset_system(sushy.RESET_ON)
    emu.system(AMT_UUID).reset_system(sushy.RESET_GRACEFUL_SHUTDOWN)
    assert emu.system(AMT_UUID).power_state == sushy.POWER_STATE_ON

    def failing():
        try:
            emu.system(AMT_UUID, retries=0)
        except sushy.exceptions.HTTPError as e:
            return e
        return None

    err = wait_for(failing, timeout=10)
    assert err.status_code == 503 and "graceful shutdown of edge-4 did not finish" in str(err)
    # ForceOff is what is left to do; it clears the error.
    system.reset_system(sushy.RESET_FORCE_OFF)
    assert emu.system(AMT_UUID).power_state == sushy.POWER_STATE_OFF
    assert amt.power_state == 8


def test_a_silent_plug_gives_redfish_errors_and_recovers(lab):
    plug, amt, make = lab
    emu = make(interval=1, timeout=1)
    wait_for(lambda: emu.system(TAPO_UUID).power_state)
    plug.set_mode("silent")

    def failing():
        try:
            emu.system(TAPO_UUID, retries=0)
        except sushy.exceptions.HTTPError as e:
            return e
        return None

    err = wait_for(failing, timeout=20)
    assert err.status_code == 503
    assert "did not answer" in str(err)
    # The AMT machine is unaffected.
    assert emu.system(AMT_UUID).power_state == sushy.POWER_STATE_OFF
    plug.set_mode("ok")
    assert wait_for(lambda: emu.system(TAPO_UUID).power_state, timeout=20) == sushy.POWER_STATE_OFF
    log = emu.log.read_text()
    assert "edge-1" in log and "did not answer" in log and "answering again" in log
    assert emu.proc.poll() is None, "the emulator survived"


def test_a_plug_answering_403_points_at_third_party_compatibility(lab):
    plug, amt, make = lab
    plug.set_mode("forbidden")
    emu = make(interval=1)

    def failing():
        try:
            emu.system(TAPO_UUID, retries=0)
        except sushy.exceptions.HTTPError as e:
            return e
        return None

    err = wait_for(failing)
    assert "Third-Party Compatibility" in str(err)


def test_check_mode_validates_the_configuration_without_reaching_devices(tmp_path):
    (tmp_path / "tapo.credentials").write_text("lab@example.org\nsecret\n")
    good = tmp_path / "good.conf"
    good.write_text('KILN_SYSTEMS = [{"name": "edge-1", "power": {"type": "tapo", "host": "192.0.2.1", '
                    '"credentials_file": "%s"}}]\n' % (tmp_path / "tapo.credentials"))
    ok = subprocess.run([sys.executable, str(LAUNCHER), "--check", "--config", str(good)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "edge-1" in ok.stdout
    bad = tmp_path / "bad.conf"
    bad.write_text('KILN_SYSTEMS = [{"name": "edge-4", "power": {"type": "amt", "host": "192.0.2.4", '
                   '"password_file": "/nonexistent/amt.password"}}, {"name": "edge-5", "power": {"type": "ipmi"}}]\n'
                   'KILN_SHUTDOWN_TIMEOUT = "5 minutes"\n')
    r = subprocess.run([sys.executable, str(LAUNCHER), "--check", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "amt.password" in r.stderr and "'ipmi'" in r.stderr
    assert "KILN_SHUTDOWN_TIMEOUT must be a positive number" in r.stderr
