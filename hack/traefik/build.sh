#!/bin/sh
# Build Traefik (MIT) with its Knative provider, a KIngress implementation, from the Go module proxy:
#   hack/traefik/build.sh OUTPUT [VERSION]
# v3.7.9, not the newest v3.7.13: v3.7.13's go.mod replaces github.com/abbot/go-http-auth with the fork
# github.com/containous/go-http-auth@v0.4.1-0.20260804094822-b975dcaa8c48, which the proxy refuses
# (403 "This module version is not available", tried 2026-11-30); v3.7.9 pins the fork's older commit
# (v0.4.1-0.20200324110947-a37a7636d23e), which it serves, and the same knative.dev/networking as v3.7.13.
# `go install github.com/traefik/traefik/v3/cmd/traefik@VERSION` does not work as is:
#  1. go.mod replaces github.com/traefik/traefik/dynamic/ext with ./pkg/config/dynamic/ext, a nested
#     module that the module zip leaves out (and that the proxy does not serve on its own, 403). Upstream
#     it is an empty extension point (two empty struct types, HTTP and Router); this writes the same.
#  2. cmd/traefik compiles in all of lego's ACME DNS-01 providers (pkg/provider/acme imports
#     github.com/go-acme/lego/.../providers/dns, and pkg/config/static imports that package, so every
#     server package does), and the proxy refuses about fifteen of their modules. This build leaves the
#     DNS-01 providers out: a DNS challenge fails with a message; nothing else changes (HTTP-01 and
#     TLS-ALPN-01 stay, and the local node uses neither).
set -eu
output=$1
version=${2:-v3.7.9}
source=$(cd "${TMPDIR:-/tmp}" && go mod download -json "github.com/traefik/traefik/v3@$version" |
         python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
work=$(mktemp -d)
trap 'chmod -R u+w "$work"; rm -rf "$work"' EXIT
cp -r "$source/." "$work/"
chmod -R u+w "$work"
cd "$work"
mkdir -p pkg/config/dynamic/ext
printf 'module github.com/traefik/traefik/dynamic/ext\n\ngo 1.24\n' > pkg/config/dynamic/ext/go.mod
printf 'package ext\n\n// HTTP is an empty dynamic.HTTP extension.\ntype HTTP struct{}\n\n// Router is an empty dynamic.Router extension.\ntype Router struct{}\n' \
  > pkg/config/dynamic/ext/ext.go
acme=pkg/provider/acme/provider.go
grep -q 'lego/v[0-9]*/providers/dns"' "$acme"
sed -i -E '/"github.com\/go-acme\/lego\/v[0-9]+\/providers\/dns"/d' "$acme"
sed -i -E 's/provider, err = dns\.NewDNSChallengeProviderByName\(p\.DNSChallenge\.Provider\)/provider, err = nil, fmt.Errorf("DNS-01 challenge provider %q: left out of this build", p.DNSChallenge.Provider)/' "$acme"
! grep -q 'dns\.NewDNSChallengeProviderByName' "$acme"
CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=mod" go build -trimpath \
  -ldflags "-s -w -X github.com/traefik/traefik/v3/pkg/version.Version=$version" -o "$output" ./cmd/traefik
