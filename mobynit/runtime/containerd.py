"""Labels of a container made by containerd alone (`ctr run`), when no engine store records it.

containerd's runc shim calls the runtime with the bundle in
`<state>/io.containerd.runtime.v2.task/<namespace>/<id>` and, in the
environment, TTRPC_ADDRESS=`<containerd socket>.ttrpc`. containerd keeps a
container's labels in its metadata database (locked while it runs), and `ctr
run` copies the image config's labels there, so during `create` the one way
to them is containerd's API: `ctr containers info <id>`, run with a time
limit. No ctr on PATH, or a caller other than the shim: nothing is found, and
the caller says where it looked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from mobynit.core.errors import shown

TASK_DIR = "io.containerd.runtime.v2.task"
CTR_NAMES = ("ctr", "balena-engine-containerd-ctr")
TIMEOUT = 10.0
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def container_labels(bundle: str, cid: str) -> tuple[dict[str, str] | None, str]:
    """(labels, where they came from), or (None, where we looked and why nothing came of it)."""
    parts = os.path.normpath(bundle).split("/")
    if len(parts) < 3 or parts[-3] != TASK_DIR or parts[-1] != cid:
        return None, "containerd's record (not called by containerd's shim: the bundle is not in its task dir)"
    namespace = parts[-2]
    ttrpc = os.environ.get("TTRPC_ADDRESS", "")
    if not ttrpc.endswith(".ttrpc"):
        return None, "containerd's record (no TTRPC_ADDRESS from containerd's shim)"
    address = ttrpc.removesuffix(".ttrpc")
    search = f"{os.environ.get('PATH', '')}:{STANDARD_PATH}"
    ctr = next((p for p in (shutil.which(n, path=search) for n in CTR_NAMES) if p), None)
    where = f"containerd's record of {cid} in namespace {namespace}"
    if ctr is None:
        return None, f"{where} (no ctr on PATH to read it)"
    argv = [ctr, "--address", address, "--namespace", namespace, "containers", "info", cid]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT,
                              env={"PATH": search})
    except subprocess.TimeoutExpired:
        return None, f"{where} (ctr gave no answer within {TIMEOUT:g} s)"
    except OSError as e:
        return None, f"{where} ({ctr}: {e.strerror})"
    if proc.returncode != 0:
        said = proc.stderr.decode(errors="replace").strip().splitlines()
        return None, f"{where} (ctr failed: {shown(said[-1] if said else proc.returncode, 200)})"
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        return None, f"{where} (ctr's answer is not JSON)"
    labels = doc.get("Labels") if isinstance(doc, dict) else None
    if labels is None:
        labels = {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        return None, f"{where} (its Labels are not a map of strings)"
    return labels, where
