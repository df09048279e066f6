#!/usr/bin/env python3
"""Import layering of kiln's src/ (issue 14): prints every file-level import cycle (CYCLE), every
import from a lower layer (disk, fs, oci, io, util, blockdev) into the flow, and every flow stage
importing a later one (UPWARD), and folder pairs that import each other (DIRCYCLE). Reads
`crate::` and `super::` paths outside `#[cfg(test)] mod tests`. Exit status 1 when it printed
anything. Usage: python3 scripts/imports.py [src]"""
import os, re, sys
root = sys.argv[1] if len(sys.argv) > 1 else "src"
LOWER = {"disk", "fs", "oci", "io", "util", "blockdev"}
FLOW = ["plan", "base", "stamp", "artifact", "build", "deliver"]
def modpath(path):
    rel = os.path.relpath(path, root)[:-3].split("/")
    if rel[-1] == "mod": rel = rel[:-1]
    return rel
files = {}
for d, _, fs in os.walk(root):
    for f in fs:
        if f.endswith(".rs"):
            p = os.path.join(d, f); files[tuple(modpath(p))] = p
edges = {}
for m, p in files.items():
    src = open(p).read()
    # drop #[cfg(test)] mod tests { ... } tail roughly
    i = src.find("#[cfg(test)]\nmod tests")
    if i >= 0: src = src[:i]
    tgts = set()
    for mm in re.finditer(r"crate::((?:[a-z_0-9]+::)*[a-z_0-9]+)", src):
        parts = mm.group(1).split("::")
        # longest prefix that is a file module
        for n in range(len(parts), 0, -1):
            if tuple(parts[:n]) in files: tgts.add(tuple(parts[:n])); break
    # use crate::x::{a, b::c}
    for mm in re.finditer(r"crate::([a-z_0-9]+)::\{([^}]*)\}", src):
        for item in mm.group(2).split(","):
            parts = [mm.group(1)] + item.strip().split("::")
            for n in range(len(parts), 0, -1):
                if tuple(parts[:n]) in files: tgts.add(tuple(parts[:n])); break
    # super::x (and `use super::{a, b}`) relative to the parent module
    parent = list(m[:-1]) if not files[m].endswith("mod.rs") else list(m[:-1])
    if files[m].endswith("mod.rs"): parent = list(m[:-1])
    for mm in re.finditer(r"\bsuper::((?:[a-z_0-9]+::)*[a-z_0-9]+)", src):
        parts = parent + mm.group(1).split("::")
        for n in range(len(parts), len(parent), -1):
            if tuple(parts[:n]) in files: tgts.add(tuple(parts[:n])); break
    for mm in re.finditer(r"\bsuper::\{([^}]*)\}", src):
        for item in mm.group(1).split(","):
            parts = parent + item.strip().split("::")
            for n in range(len(parts), len(parent), -1):
                if tuple(parts[:n]) in files: tgts.add(tuple(parts[:n])); break
    tgts.discard(m)
    edges[m] = tgts
top = lambda m: m[0] if m else ""
found = []
def report(*parts):
    found.append(1)
    print(*parts)
# upward imports
for m, ts in sorted(edges.items()):
    for t in sorted(ts):
        a, b = top(m), top(t)
        if a == b or a in ("cli", "main", "lib", ""): continue
        bad = False
        if a in LOWER and b not in LOWER: bad = True
        if a in FLOW and b in FLOW and FLOW.index(b) > FLOW.index(a): bad = True
        if bad or b == "cli": report("UPWARD", "::".join(m), "->", "::".join(t))
# file-level cycles (SCCs)
idx = {}; low = {}; st = []; on = set(); sccs = []; c = [0]
sys.setrecursionlimit(10000)
def sc(v):
    idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in idx: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], idx[w])
    if low[v] == idx[v]:
        comp = []
        while True:
            w = st.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(comp)
for v in list(edges):
    if v not in idx: sc(v)
for comp in sccs:
    report("CYCLE", sorted("::".join(x) for x in comp))
# folder-level cycles among top-level dirs
tedges = {}
for m, ts in edges.items():
    for t in ts:
        if top(m) != top(t): tedges.setdefault(top(m), set()).add(top(t))
for a, bs in sorted(tedges.items()):
    for b in sorted(bs):
        if a in tedges.get(b, ()) and a < b: report("DIRCYCLE", a, "<->", b)
sys.exit(1 if found else 0)
