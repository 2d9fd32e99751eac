#!/usr/bin/env bash
# Prepares this host for the node agent's BCC programs. Idempotent: a host that is ready is left alone.
#   - BCC compiles programs against kernel headers found at /lib/modules/$(uname -r)/{build,source}; the
#     kernel here is not Debian's, so Debian's newest headers stand in (the programs use only tracepoint
#     formats, __sk_buff and helpers, which do not depend on the kernel's struct layouts).
#   - The `bcc` Python module lives in Debian's dist-packages; a .pth file makes it importable from the venv.
#   - tracefs carries the tracepoint formats BCC reads.
set -euo pipefail
venv=${1:?usage: ebpf-host.sh VENV}
modules=/lib/modules/$(uname -r)
amd64=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)
[ -n "$amd64" ] && [ -n "$common" ] || { echo "kernel headers missing: run make deps" >&2; exit 1; }
mkdir -p "$modules"
[ -e "$modules/build" ] || ln -sfn "$amd64" "$modules/build"
[ -e "$modules/source" ] || ln -sfn "$common" "$modules/source"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Only the bcc package is wanted from dist-packages; a .pth line adding all of dist-packages would let
# Debian's other modules shadow the venv's, so the line imports bcc's parent through a tiny shim dir.
shim="$venv/debian-bcc"
mkdir -p "$shim"
ln -sfn /usr/lib/python3/dist-packages/bcc "$shim/bcc"
echo "$(cd "$shim" && pwd)" > "$site/debian-bcc.pth"
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
# The runtime's warm-pool held process (ebpf/programs/held.c), compiled statically into the cache.
"$venv/bin/python" -m agentkube.ebpf.held >/dev/null
