"""Before any test module loads the etcd client: gRPC must come up with its fork handlers
off, as it does in the agent (coloft.arbiter.etcd). The tests fork etcd and QEMU (fork, then
exec) while gRPC calls may be in flight, and a fork that meets one with the handlers on
aborts the child before its exec (seen: etcd killed by SIGABRT while a contract test
restarted it)."""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
