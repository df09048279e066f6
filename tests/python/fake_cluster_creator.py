"""A stand-in for CCPDashButton's ccp-provisioner/cluster_creator.py: the same arguments and the same
output lines ("Creating cluster <name> on <host>... please standby.", then "Master IP: <ip>" or
"Unable to create cluster <name> on <host>" and exit 1), without a Cisco Container Platform.

Its "cluster skeleton JSON" argument says how to behave: {"sleep": seconds, "modes": ["ok" |
"fail" | "hang", ...]} (one mode per call, "ok" after the list). Every call appends its cluster
name to <skeleton>.calls and its pids to <skeleton>.pids; call n answers Master IP 11.0.<n/250>.<n%250>.
"""

import json
import os
import subprocess
import sys
import time

try:
    ccp_host, username, password, cluster_name, cidr, skeleton, cni = sys.argv[1:8]
except ValueError:
    print("Usage: python3 cluster_creator.py ccp_hostname ccp_username ccp_password "
          "tenant_cluster_name cluster_subnet cluster_skeleton_json_file cni")
    sys.exit(1)

with open(skeleton) as f:
    plan = json.load(f)
with open(skeleton + ".calls", "a") as f:
    f.write(cluster_name + "\n")
with open(skeleton + ".pids", "a") as f:
    f.write("%d\n" % os.getpid())
with open(skeleton + ".calls") as f:
    n = len(f.read().split())
modes = plan.get("modes", [])
mode = modes[n - 1] if n <= len(modes) else "ok"

print("Creating cluster {} on {}... please standby.".format(cluster_name, ccp_host), flush=True)
if mode == "hang":
    # Hangs in a child, as a provisioner waiting on a tool would: a timeout must stop both.
    child = subprocess.Popen(["sleep", "3600"])
    with open(skeleton + ".pids", "a") as f:
        f.write("%d\n" % child.pid)
    child.wait()
time.sleep(plan.get("sleep", 0))
if mode == "fail":
    print("Unable to create cluster {} on {}".format(cluster_name, ccp_host))
    sys.exit(1)
print("Master IP: {}".format("11.0.%d.%d" % (n // 250, n % 250)), sep=" ", end="\n", file=sys.stdout, flush=True)
