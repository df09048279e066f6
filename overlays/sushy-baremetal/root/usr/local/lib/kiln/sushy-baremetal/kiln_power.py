"""Power backends for kiln's sushy-tools driver: TP-Link Tapo smart plugs and Intel AMT.

Each backend answers three questions for one machine: is it on, switch it (on, off hard, off
graceful), and — where the hardware can — boot from the network next time. A backend raises
``PowerError`` with a sentence a human can act on; the driver turns that into a Redfish error.
``power_off_graceful()`` says whether the machine is off when it returns: a plug cuts the power,
AMT only asks the operating system to shut down, which takes the time it takes.
"""

import asyncio
import logging
import re
import threading
import uuid as uuidlib
import xml.etree.ElementTree as ET

import requests
from requests.auth import HTTPDigestAuth

try:  # only the Tapo backend needs plugp100; an AMT-only site may go without it
    from plugp100.api.requests.tapo_request import TapoRequest
except ImportError:  # pragma: no cover
    TapoRequest = None

log = logging.getLogger("kiln-sushy")


class PowerError(Exception):
    """The power device failed or did not answer; the message says which and why."""


def read_secret(path):
    with open(path, encoding="utf-8") as f:
        return f.read().strip("\r\n")


class TapoPlug:
    """A Tapo P100/P110 plug, spoken to with plugp100 over KLAP (the protocol current firmware
    uses; PyPI's PyP100 only speaks the retired passthrough one).

    plugp100 is asyncio-based and its session belongs to one event loop, so every plug owns a
    loop on its own thread and all calls are submitted to it: one request at a time per plug.
    """

    def __init__(self, name, host, credentials_file, timeout=10.0):
        from plugp100.api.protocol.klap import klap_handshake_v2
        from plugp100.api.protocol.klap.klap_protocol import KlapProtocol
        from plugp100.api.tapo_client import TapoClient
        from plugp100.common.credentials import AuthCredential

        lines = read_secret(credentials_file).splitlines()
        if len(lines) < 2:
            raise ValueError(
                "%s: %s must hold the TP-Link account e-mail on the first line and its password on the second"
                % (name, credentials_file))
        self.name = name
        self.host = host
        self.timeout = timeout
        self._creds = AuthCredential(lines[0].strip(), lines[1].strip())
        self._make = lambda: TapoClient(
            self._creds, "http://%s/app" % host,
            protocol=KlapProtocol(self._creds, "http://%s/app" % host, klap_handshake_v2()))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tapo-%s" % name, daemon=True)
        self._thread.start()
        self._client = None

    def _run(self, coro_fn):
        async def call():
            if self._client is None:
                self._client = self._make()
            return await coro_fn(self._client)

        fut = asyncio.run_coroutine_threadsafe(call(), self._loop)
        try:
            result = fut.result(self.timeout)
        except Exception as e:  # timeouts and transport errors alike
            fut.cancel()
            self._reset()
            raise PowerError(self._explain(e)) from e
        if hasattr(result, "is_failure") and result.is_failure():
            self._reset()
            raise PowerError(self._explain(result.error()))
        return result.get() if hasattr(result, "get") else result

    def _reset(self):
        """Drop the session so the next call starts with a fresh handshake."""
        client, self._client = self._client, None
        if client is not None:
            asyncio.run_coroutine_threadsafe(client.close(), self._loop)

    def _explain(self, e):
        text = str(e) or e.__class__.__name__
        if re.search(r"\b403\b", text):
            return ("Tapo plug %s (%s) refused the login with HTTP 403: turn on 'Third-Party "
                    "Compatibility' (Tapo app > Me > Third-Party Services) and check the "
                    "credentials" % (self.name, self.host))
        if isinstance(e, (asyncio.TimeoutError, TimeoutError)) or "timeout" in text.lower():
            return "Tapo plug %s (%s) did not answer within %.0f s" % (self.name, self.host, self.timeout)
        return "Tapo plug %s (%s): %s" % (self.name, self.host, text)

    def is_on(self):
        async def info(c):
            return await c.execute_raw_request(TapoRequest.get_device_info())

        data = self._run(info)
        if "device_on" not in data:
            raise PowerError("Tapo plug %s (%s) sent device info without device_on" % (self.name, self.host))
        return bool(data["device_on"])

    def set_on(self, on):
        async def switch(c):
            return await c.execute_raw_request(TapoRequest.set_device_info({"device_on": bool(on)}))

        self._run(switch)

    def power_off_graceful(self):
        # A plug can only cut the power; say so, since Ironic asked for more.
        log.warning("%s: a Tapo plug cannot shut down gracefully; switching it off", self.name)
        self.set_on(False)
        return True  # off now

    def set_next_boot_pxe(self):
        # The machine's firmware decides; PXE must come first in its boot order.
        log.info("%s: boot override recorded; a Tapo-switched machine boots per its firmware order", self.name)


# --- Intel AMT over WS-Management -------------------------------------------------------------

WSMAN = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"
ADDRESSING = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
ENUMERATION = "http://schemas.xmlsoap.org/ws/2004/09/enumeration"
CIM = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/"
AMT = "http://intel.com/wbem/wscim/1/amt-schema/1/"
ANONYMOUS = ADDRESSING + "/role/anonymous"

# CIM_PowerManagementService.RequestPowerStateChange values, as Intel AMT implements them.
AMT_ON = 2
AMT_CYCLE = 5
AMT_OFF_HARD = 8
AMT_RESET = 10
AMT_OFF_GRACEFUL = 12


def _envelope(action, resource, body, selectors=None):
    sel = ""
    if selectors:
        sel = "<w:SelectorSet>%s</w:SelectorSet>" % "".join(
            '<w:Selector Name="%s">%s</w:Selector>' % kv for kv in selectors.items())
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:a="%s" xmlns:w="%s">'
        "<s:Header><a:Action s:mustUnderstand=\"true\">%s</a:Action>"
        "<a:To s:mustUnderstand=\"true\">/wsman</a:To>"
        "<w:ResourceURI s:mustUnderstand=\"true\">%s</w:ResourceURI>"
        "<a:MessageID s:mustUnderstand=\"true\">uuid:%s</a:MessageID>"
        "<a:ReplyTo><a:Address>%s</a:Address></a:ReplyTo>"
        "<w:OperationTimeout>PT60S</w:OperationTimeout>%s</s:Header>"
        "<s:Body>%s</s:Body></s:Envelope>"
        % (ADDRESSING, WSMAN, action, resource, uuidlib.uuid4(), ANONYMOUS, sel, body)
    )


class AmtHost:
    """A machine with Intel AMT, driven through WS-Management (port 16992, HTTP digest auth):
    power state from CIM_AssociatedPowerManagementService, switching with
    CIM_PowerManagementService.RequestPowerStateChange, one-time PXE boot with
    CIM_BootConfigSetting.ChangeBootOrder and CIM_BootService.SetBootConfigRole."""

    def __init__(self, name, host, user, password_file, timeout=10.0):
        self.name = name
        self.host = host if ":" in host else host + ":16992"
        self.url = "http://%s/wsman" % self.host
        self.auth = HTTPDigestAuth(user, read_secret(password_file))
        self.timeout = timeout
        self.session = requests.Session()

    def _post(self, action, resource, body="", selectors=None):
        data = _envelope(action, resource, body, selectors)
        try:
            r = self.session.post(self.url, data=data.encode(), auth=self.auth, timeout=self.timeout,
                                  headers={"Content-Type": "application/soap+xml;charset=UTF-8"})
        except requests.RequestException as e:
            raise PowerError("AMT on %s (%s) did not answer: %s" % (self.name, self.host, e)) from e
        if r.status_code == 401:
            raise PowerError("AMT on %s (%s) refused the user or password (HTTP 401)" % (self.name, self.host))
        if r.status_code != 200:
            raise PowerError("AMT on %s (%s) answered HTTP %d to %s" % (
                self.name, self.host, r.status_code, action.rsplit("/", 1)[-1]))
        try:
            return ET.fromstring(r.content)
        except ET.ParseError as e:
            raise PowerError("AMT on %s (%s) sent a reply that is not XML" % (self.name, self.host)) from e

    @staticmethod
    def _find(tree, local):
        for el in tree.iter():
            if el.tag.rsplit("}", 1)[-1] == local:
                return el.text
        return None

    def _check_return(self, tree, what):
        rv = self._find(tree, "ReturnValue")
        if rv != "0":
            raise PowerError("AMT on %s (%s) refused %s (ReturnValue %s)" % (self.name, self.host, what, rv))

    def power_state(self):
        resource = CIM + "CIM_AssociatedPowerManagementService"
        tree = self._post(ENUMERATION + "/Enumerate", resource,
                          '<Enumerate xmlns="%s"/>' % ENUMERATION)
        ctx = self._find(tree, "EnumerationContext")
        if not ctx:
            raise PowerError("AMT on %s (%s) gave no enumeration context" % (self.name, self.host))
        tree = self._post(ENUMERATION + "/Pull", resource,
                          '<Pull xmlns="%s"><EnumerationContext>%s</EnumerationContext></Pull>' % (ENUMERATION, ctx))
        state = self._find(tree, "PowerState")
        if state is None:
            raise PowerError("AMT on %s (%s) reported no PowerState" % (self.name, self.host))
        return int(state)

    def is_on(self):
        return self.power_state() == AMT_ON

    def _request_power(self, value):
        resource = CIM + "CIM_PowerManagementService"
        body = (
            '<p:RequestPowerStateChange_INPUT xmlns:p="%s">'
            "<p:PowerState>%d</p:PowerState>"
            '<p:ManagedElement><a:Address>%s</a:Address><a:ReferenceParameters>'
            "<w:ResourceURI>%sCIM_ComputerSystem</w:ResourceURI><w:SelectorSet>"
            '<w:Selector Name="CreationClassName">CIM_ComputerSystem</w:Selector>'
            '<w:Selector Name="Name">ManagedSystem</w:Selector>'
            "</w:SelectorSet></a:ReferenceParameters></p:ManagedElement>"
            "</p:RequestPowerStateChange_INPUT>" % (resource, value, ANONYMOUS, CIM)
        )
        tree = self._post(resource + "/RequestPowerStateChange", resource, body,
                          {"CreationClassName": "CIM_PowerManagementService",
                           "Name": "Intel(r) AMT Power Management Service",
                           "SystemCreationClassName": "CIM_ComputerSystem",
                           "SystemName": "Intel(r) AMT"})
        self._check_return(tree, "power state %d" % value)

    def set_on(self, on):
        self._request_power(AMT_ON if on else AMT_OFF_HARD)

    def power_off_graceful(self):
        # AMT passes the request to the OS (an ACPI power-button event) and keeps reporting the
        # machine on until the OS has shut it down.
        self._request_power(AMT_OFF_GRACEFUL)
        return False  # off once is_on() says so

    def set_next_boot_pxe(self):
        resource = CIM + "CIM_BootConfigSetting"
        body = (
            '<p:ChangeBootOrder_INPUT xmlns:p="%s"><p:Source>'
            "<a:Address>%s</a:Address><a:ReferenceParameters>"
            "<w:ResourceURI>%sCIM_BootSourceSetting</w:ResourceURI><w:SelectorSet>"
            '<w:Selector Name="InstanceID">Intel(r) AMT: Force PXE Boot</w:Selector>'
            "</w:SelectorSet></a:ReferenceParameters></p:Source></p:ChangeBootOrder_INPUT>"
            % (resource, ANONYMOUS, CIM)
        )
        tree = self._post(resource + "/ChangeBootOrder", resource, body,
                          {"InstanceID": "Intel(r) AMT: Boot Configuration 0"})
        self._check_return(tree, "the PXE boot order")
        service = CIM + "CIM_BootService"
        body = (
            '<p:SetBootConfigRole_INPUT xmlns:p="%s"><p:BootConfigSetting>'
            "<a:Address>%s</a:Address><a:ReferenceParameters>"
            "<w:ResourceURI>%sCIM_BootConfigSetting</w:ResourceURI><w:SelectorSet>"
            '<w:Selector Name="InstanceID">Intel(r) AMT: Boot Configuration 0</w:Selector>'
            "</w:SelectorSet></a:ReferenceParameters></p:BootConfigSetting>"
            "<p:Role>1</p:Role></p:SetBootConfigRole_INPUT>" % (service, ANONYMOUS, CIM)
        )
        tree = self._post(service + "/SetBootConfigRole", service, body,
                          {"CreationClassName": "CIM_BootService",
                           "Name": "Intel(r) AMT Boot Service",
                           "SystemCreationClassName": "CIM_ComputerSystem",
                           "SystemName": "Intel(r) AMT"})
        self._check_return(tree, "the next-boot role")


def make_backend(system):
    """The backend a system's ``power`` table names."""
    p = system.get("power") or {}
    kind = p.get("type")
    name = system["name"]
    if kind == "tapo":
        return TapoPlug(name, p["host"], p["credentials_file"], float(p.get("timeout", 10)))
    if kind == "amt":
        return AmtHost(name, p["host"], p.get("user", "admin"), p["password_file"], float(p.get("timeout", 10)))
    raise ValueError("system %s: power type %r is not 'tapo' or 'amt'" % (name, kind))
