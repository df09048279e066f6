#!/usr/bin/env python3
"""What ironic-python-agent itself decides about image files and their checksum files.

    ipa_judge.py CASES.json

CASES.json is a list of {"name", "url", "image", "sums"}: the image's URL (IPA matches the
checksum file's lines against its basename), the image file, and the text of the checksum file
served beside it. For each case this runs IPA's own code, from the installed
ironic-python-agent and oslo.utils: `standby._fetch_checksum` on the checksum file (the download
replaced by the file's text), `standby._get_algorithm_by_length` and the exact comparison
`ImageDownload.verify_image` makes, then `disk_utils.get_and_validate_image_format` (oslo.utils'
format inspector, its safety checks, IPA's permitted formats) as IPA runs it when Ironic names no
disk format. Prints a JSON list of {"name", "accepted", "format", "why"}.
"""

import json
import sys

from ironic_python_agent import config

config.populate_config()

from ironic_python_agent import disk_utils  # noqa: E402
from ironic_python_agent import errors  # noqa: E402
from ironic_python_agent.extensions import standby  # noqa: E402


class Served:
    text = ""


standby._download_with_proxy = lambda image_info, url, image_id: Served


def verdict(case):
    with open(case["sums"], encoding="utf-8") as f:
        Served.text = f.read()
    info = {"id": case["name"], "urls": [case["url"]]}
    try:
        expected = standby._fetch_checksum(case["url"] + ".sha256sum", info)
        digest = standby._get_algorithm_by_length(expected)
    except (errors.RESTError, ValueError) as e:
        return False, None, f"checksum file: {e}"
    with open(case["image"], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        return False, None, f"{digest.hexdigest()} != {expected}"
    try:
        fmt, _size = disk_utils.get_and_validate_image_format(case["image"], None)
    except errors.RESTError as e:
        return False, None, f"image: {e}"
    return True, fmt, ""


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    out = []
    for case in cases:
        accepted, fmt, why = verdict(case)
        out.append({"name": case["name"], "accepted": accepted, "format": fmt, "why": why})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
