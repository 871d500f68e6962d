#!/usr/bin/env python3
"""tools/node/stop DIR [TIMEOUT] — powers off the node in DIR and cleans up.

``systemctl poweroff`` inside, SIGKILL to the node's PID 1 if it is still there after
TIMEOUT seconds (default 10), then: kills anything left in the node's namespaces,
removes the node's cgroup folder and the overlays' upper layers (DIR/rw). The node's
mounts live only in its own mount namespace, which is gone with its last process;
its /tmp (and so PrivateTmp='s /tmp/systemd-private-*) is a tmpfs of that namespace.
Idempotent: exit 0 also for a node that is already stopped or never booted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nodelib


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[1].startswith("-"):
        print("usage: stop DIR [TIMEOUT]", file=sys.stderr)
        return 2
    timeout = float(argv[2]) if len(argv) == 3 else 10.0
    try:
        timings = nodelib.stop(Path(argv[1]).absolute(), timeout=timeout)
    except (nodelib.NodeError, OSError) as exc:
        print(f"stop: {exc}", file=sys.stderr)
        return 1
    if timings.get("killed"):
        print(f"stop: the node did not power off within {timeout:g} s; killed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
