"""kiln's "baremetal" systems driver for sushy-tools: Redfish systems backed by smart plugs and
Intel AMT instead of virtual machines.

Ironic polls power state often; a Tapo plug falls over when asked a few times a second. So the
state Ironic reads comes from a cache that one background poller per device refreshes every
``KILN_POWER_POLL_INTERVAL`` seconds (default 30) and that a reset updates at once: Ironic's
polling never reaches a plug. Calls to one device are serialised. A device that does not answer
makes reads fail with a Redfish error (and a log line) until it answers again.

A graceful shutdown on AMT only asks the operating system to shut down; Ironic then waits for the
power state to read off before it goes on (its redfish power interface, through
node_wait_for_power_state). So the cache keeps what AMT reports — on — and that machine's poller
asks every ``KILN_SHUTDOWN_POLL_INTERVAL`` seconds (default 3) until AMT reports off. If it is still
on after ``KILN_SHUTDOWN_TIMEOUT`` seconds (default 300, under Ironic's own 600), reads fail with a
Redfish error that says so, until the machine is off or another reset is asked for. A graceful
restart is the same wait, then the pause and power-on. A plug cuts the power at once, so its
poller never polls faster.

Boot source overrides (target, Once/Continuous, UEFI mode) are kept in a JSON state file so they
survive restarts; for AMT a PXE override is sent to the machine as its next boot device.
"""

import json
import logging
import os
import tempfile
import threading
import time
import uuid as uuidlib

from sushy_tools import error
from sushy_tools.emulator.resources.systems.base import AbstractSystemsDriver

import kiln_power

log = logging.getLogger("kiln-sushy")

# Between off and on in a restart: long enough for PSUs and plugs to really drop the load.
DEFAULT_RESTART_DELAY = 5.0
DEFAULT_SHUTDOWN_POLL_INTERVAL = 3.0
DEFAULT_SHUTDOWN_TIMEOUT = 300.0


class Device:
    """One machine's power device with its cache and poller."""

    def __init__(self, system, backend, interval, shutdown_interval=DEFAULT_SHUTDOWN_POLL_INTERVAL,
                 shutdown_timeout=DEFAULT_SHUTDOWN_TIMEOUT):
        self.name = system["name"]
        self.backend = backend
        self.interval = interval
        self.shutdown_interval = shutdown_interval
        self.shutdown_timeout = shutdown_timeout
        self.lock = threading.Lock()  # one request at a time per device
        self.state = None  # "On" / "Off" once known
        self.error = None  # why the last poll failed
        self.updated = 0.0
        self.shutdown = None  # a graceful shutdown under way: (deadline, what to do once off)
        self.stuck = None  # why the last graceful shutdown did not end
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="poll-%s" % self.name, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._wake.set()

    def _poll_loop(self):
        while not self._stop.is_set():
            self._wake.clear()  # a shutting_down() from now on cuts the next wait short
            then = self.refresh()
            if then is not None:
                self._after_shutdown(then)
            self._wake.wait(self.shutdown_interval if self.shutdown else self.interval)

    def refresh(self):
        """Reads the power state; returns what to do now that a graceful shutdown has ended."""
        with self.lock:
            try:
                on = self.backend.is_on()
            except kiln_power.PowerError as e:
                if self.error != str(e):
                    log.error("%s: %s", self.name, e)
                self.error = str(e)
                return None
            except Exception as e:  # a library bug must not kill the poller
                log.exception("%s: polling failed", self.name)
                self.error = "%s: %s" % (self.name, e)
                return None
            if self.error:
                log.info("%s: answering again", self.name)
            self.error = None
            self.state = "On" if on else "Off"
            self.updated = time.time()
            if not on:
                self.stuck = None
            if self.shutdown is None:
                return None
            deadline, then = self.shutdown
            if not on:
                log.info("%s: off after the graceful shutdown", self.name)
                self.shutdown = None
                return then
            if time.monotonic() > deadline:
                self.shutdown = None
                self.stuck = ("graceful shutdown of %s did not finish: the machine still reports power on %.0f s "
                              "after it was asked (does its OS act on the ACPI power button?); ForceOff cuts the "
                              "power" % (self.name, self.shutdown_timeout))
                log.error("%s", self.stuck)
            return None

    def shutting_down(self, then=None):
        """A graceful shutdown was asked for: poll faster until the machine is off, then `then()`."""
        with self.lock:
            self.shutdown = (time.monotonic() + self.shutdown_timeout, then)
            self.stuck = None
        self._wake.set()

    def _after_shutdown(self, then):
        try:
            then()
        except error.FishyError as e:  # already logged by act()
            log.error("%s: after the graceful shutdown: %s", self.name, e)
        except Exception:
            log.exception("%s: after the graceful shutdown", self.name)

    def cancel_shutdown(self):
        with self.lock:
            self.shutdown = None
            self.stuck = None

    def cached_state(self):
        if self.state is None and self.error is None:
            # Right after start: wait for the first poll (holding the lock) rather than fail.
            with self.lock:
                pass
        if self.error is not None:
            raise error.FishyError("power state of %s unknown: %s" % (self.name, self.error), code=503)
        if self.stuck is not None:
            raise error.FishyError(self.stuck, code=503)
        if self.state is None:
            raise error.FishyError("power state of %s not read yet; retry shortly" % self.name, code=503)
        return self.state

    def act(self, what, fn):
        with self.lock:
            try:
                return fn()
            except kiln_power.PowerError as e:
                log.error("%s: %s failed: %s", self.name, what, e)
                self.error = str(e)
                raise error.FishyError("%s of %s failed: %s" % (what, self.name, e), code=503)


class State:
    """Boot overrides by system UUID, in a JSON file written atomically."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.data = {}
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.data = json.load(f)

    def get(self, uuid):
        with self.lock:
            return dict(self.data.get(uuid, {}))

    def update(self, uuid, **values):
        with self.lock:
            self.data.setdefault(uuid, {}).update(values)
            if not self.path:
                return
            d = os.path.dirname(self.path) or "."
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".state-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)


class BaremetalDriver(AbstractSystemsDriver):
    """sushy-tools systems driver over ``KILN_SYSTEMS`` in the emulator's configuration."""

    @classmethod
    def initialize(cls, config, logger, *args, **kwargs):
        cls._config = config
        cls._logger = logger
        return cls

    def __init__(self, backend_factory=kiln_power.make_backend):
        super().__init__()
        cfg = self._config
        systems = cfg.get("KILN_SYSTEMS") or []
        if not systems:
            raise RuntimeError("KILN_SYSTEMS is empty: the configuration names no machines")
        interval = float(cfg.get("KILN_POWER_POLL_INTERVAL", 30))
        shutdown_interval = float(cfg.get("KILN_SHUTDOWN_POLL_INTERVAL", DEFAULT_SHUTDOWN_POLL_INTERVAL))
        shutdown_timeout = float(cfg.get("KILN_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT))
        self.restart_delay = float(cfg.get("KILN_RESTART_DELAY", DEFAULT_RESTART_DELAY))
        self.state = State(cfg.get("KILN_STATE_FILE"))
        self.systems_by_uuid = {}
        self.by_name = {}
        self.devices = {}
        for s in systems:
            name = s["name"]
            uuid = str(uuidlib.UUID(s["uuid"])) if s.get("uuid") else str(
                uuidlib.uuid5(uuidlib.NAMESPACE_DNS, "%s.kiln-sushy" % name))
            if uuid in self.systems_by_uuid or name in self.by_name:
                raise RuntimeError("system %s is configured twice" % name)
            self.systems_by_uuid[uuid] = dict(s, uuid=uuid)
            self.by_name[name] = uuid
            self.devices[uuid] = Device(s, backend_factory(s), interval, shutdown_interval, shutdown_timeout)
        for d in self.devices.values():
            d.start()

    @property
    def driver(self):
        return "<kiln baremetal>"

    @property
    def systems(self):
        return list(self.systems_by_uuid)

    def _uuid(self, identity):
        if identity in self.systems_by_uuid:
            return identity
        if identity in self.by_name:
            return self.by_name[identity]
        raise error.NotFound("no system %s" % identity)

    def uuid(self, identity):
        return self._uuid(identity)

    def name(self, identity):
        return self.systems_by_uuid[self._uuid(identity)]["name"]

    def get_power_state(self, identity):
        return self.devices[self._uuid(identity)].cached_state()

    def set_power_state(self, identity, state):
        uuid = self._uuid(identity)
        dev = self.devices[uuid]
        b = dev.backend
        if state == "Nmi":
            raise error.BadRequest("%s cannot send an NMI" % dev.name)
        if state not in POWER_RESETS:
            raise error.BadRequest("unknown ResetType %r" % state)
        dev.cancel_shutdown()  # a new order replaces a graceful shutdown under way
        if state in ("On", "ForceOn"):
            self._power_on(uuid)
        elif state == "ForceOff":
            dev.act(state, lambda: b.set_on(False))
            dev.state = "Off"
        elif state == "GracefulShutdown":
            if dev.act(state, b.power_off_graceful):
                dev.state = "Off"
            else:
                dev.shutting_down()  # the state stays what the machine reports until it is off
        elif state == "GracefulRestart":
            if dev.act(state, b.power_off_graceful):
                self._on_again(uuid)
            else:
                dev.shutting_down(then=lambda: self._on_again(uuid))
        else:  # ForceRestart, PowerCycle: off, wait, on — the only restart a plug can do
            dev.act(state, lambda: b.set_on(False))
            self._on_again(uuid)
        dev.error = None
        dev.updated = time.time()

    def _on_again(self, uuid):
        """The second half of a restart, once the machine is off: the pause, then on."""
        self.devices[uuid].state = "Off"
        time.sleep(self.restart_delay)
        self._power_on(uuid)

    def _power_on(self, uuid):
        dev = self.devices[uuid]
        self._before_power_on(uuid)
        dev.act("On", lambda: dev.backend.set_on(True))
        dev.state = "On"

    def _before_power_on(self, uuid):
        """A pending PXE override is armed on AMT machines right before they start."""
        st = self.state.get(uuid)
        if st.get("target") == "Pxe" and st.get("enabled") in ("Once", "Continuous"):
            dev = self.devices[uuid]
            dev.act("PXE boot override", dev.backend.set_next_boot_pxe)
            if st.get("enabled") == "Once":
                # Redfish: a Once override is consumed by the boot it applies to.
                self.state.update(uuid, target="Hdd", enabled="Disabled")

    def get_boot_device(self, identity):
        return self.state.get(self._uuid(identity)).get("target") or "Hdd"

    def set_boot_device(self, identity, boot_source):
        if boot_source not in ("Pxe", "Hdd", "Cd", "None", "BiosSetup"):
            raise error.BadRequest("boot source %s is not supported" % boot_source)
        uuid = self._uuid(identity)
        enabled = getattr(_patch_context, "enabled", None) or self.state.get(uuid).get("enabled") or "Once"
        self.state.update(uuid, target=boot_source, enabled=enabled)
        log.info("%s: boot override %s (%s)", self.name(uuid), boot_source, enabled)

    def get_boot_override_enabled(self, identity):
        st = self.state.get(self._uuid(identity))
        return st.get("enabled") or "Disabled"

    def get_boot_mode(self, identity):
        return self.state.get(self._uuid(identity)).get("mode") or "UEFI"

    def set_boot_mode(self, identity, boot_mode):
        if boot_mode not in ("UEFI", "Legacy"):
            raise error.BadRequest("boot mode %s is not supported" % boot_mode)
        self.state.update(self._uuid(identity), mode=boot_mode)

    def get_nics(self, identity):
        s = self.systems_by_uuid[self._uuid(identity)]
        return [{"id": n["mac"], "mac": n["mac"]} for n in s.get("nics", [])]


POWER_RESETS = ("On", "ForceOn", "ForceOff", "GracefulShutdown", "GracefulRestart", "ForceRestart", "PowerCycle")

# The emulator's PATCH handler ignores BootSourceOverrideEnabled; the launcher stores it here for
# the duration of one request so set_boot_device can keep it.
_patch_context = threading.local()
