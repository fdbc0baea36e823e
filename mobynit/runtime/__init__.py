"""The OCI runtime the engine uses for extension containers (`mobynit-runtime`), and their manager.

An extension is an image whose files the assembler overlays on the root at
the next boot; nothing in it ever runs as a container. The engine still
insists on a container life cycle, so this runtime speaks runc's command line
to containerd's runc shim and, instead of running a process:

  create  checks the extension, runs its `hooks/create`, forks a proxy
          process (the pid containerd tracks) and records the state;
  start   runs `hooks/start` and tells the proxy to exit 0, so the engine
          shows the container as "Exited (0)";
  kill    signals the proxy;
  delete  runs `hooks/delete` and forgets the container;
  state   prints the OCI state.

Each call takes a lock on its container, so the shim racing `kill` against
`delete` never tears the state, and the state file is replaced atomically, so
a power cut leaves the old state or the new one, never half of either.
Nothing under the state root is reached by path: directories are opened
O_NOFOLLOW|O_DIRECTORY and acted on through their descriptors.

containerd calls this several times per container: the module imports little,
and the boot-time checks (policy, store) only at create.

Rooms: log (runc's log file), spec (the bundle: rootfs, labels, volumes),
hooks (the image's hooks and their environment), proxy (the process the shim
tracks), state (what is remembered per container, under its lock), commands
(create, start, kill, delete, state, features), cli (runc's flag syntax and
the Go tool's, under either name), containerd (labels of a container made by
containerd alone), engine and manager (`mobynit-extension-manager`).
"""

from mobynit.core.errors import MobynitError

PROG = "mobynit-runtime"
OCI_VERSION = "1.0.2"


class RuntimeFailure(MobynitError):
    """A runtime command cannot do what it was asked; the state is as it was."""
