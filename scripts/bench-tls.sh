#!/usr/bin/env bash
# What TLS on the broker's own listener costs: each transport plain and over TLS (a
# `SSL://` listener, rustls in user space; the native client over rustls too), interleaved
# in one run; writes docs/bench/tls/. This kernel has no kTLS (CONFIG_TLS is not set), so
# user-space TLS is what is measured (docs/security.md).
#
#   scripts/bench-tls.sh        # REPS=3 DURATION=10 by default
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${REPS:-3}
duration=${DURATION:-10}
cargo build --release --workspace
certs=$(mktemp -d)
trap 'rm -rf "$certs"' EXIT
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -keyout "$certs/ca.key" -out "$certs/ca.pem" -days 2 -subj /CN=bench-ca 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$certs/server.ext"
openssl req "${ec[@]}" -keyout "$certs/server.key" -out "$certs/server.csr" -subj /CN=127.0.0.1 2>/dev/null
openssl x509 -req -in "$certs/server.csr" -CA "$certs/ca.pem" -CAkey "$certs/ca.key" -CAcreateserial \
  -out "$certs/server.pem" -days 2 -extfile "$certs/server.ext" 2>/dev/null
tls="--tls-cert=$certs/server.pem,--tls-key=$certs/server.key,--tls-ca=$certs/ca.pem"
./target/release/slipstream bench \
  --target slipstream:tcp --target "slipstream:tcp,$tls" \
  --target slipstream:uring --target "slipstream:uring,$tls" \
  --workload latency-128b --workload max-throughput-1k \
  --repetitions "$reps" --duration "$duration" \
  --note "tls: the same broker with an SSL:// listener (rustls 0.23 on ring, TLS 1.3, ECDSA P-256 certificate); the native client connects to it over rustls. Plain targets use the plaintext listener." \
  --note "User-space TLS copies every fetched record byte into rustls's records (zero-copy fetch ends); this kernel has no kTLS (CONFIG_TLS is not set), so the kernel cannot encrypt in place." \
  --out docs/bench/tls
