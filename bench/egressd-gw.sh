#!/bin/sh
# egressd-gw.sh PORT - runs `egressd run`, the shipped daemon, as a system of
# the shared peers script (its CUSTOM_TLS hook starts this in the gateway
# namespace with SERVER_IP set; bench/proxy-tls.sh with EGRESSD=daemon).
# Unlike proxybench it has everything egressd run has: the DNS forwarder,
# capture on the client-side interface (AF_PACKET), the audit journal, the
# ledger, the admin server, and its choice of Go processors.
# The peers script keeps its own nftables REDIRECT, so the daemon runs with
# --no-firewall; names are vouched for by a fresh lookup (no client asks
# our DNS here) through a dnsmasq on the gateway's loopback that answers
# *.allowed.test with SERVER_IP (and a documentation IPv6 address), with
# a TTL of 300 s as a real zone has: dnsmasq's own default of 0 would make
# every lookup go upstream, and its answer to AAAA without an address
# (REFUSED) is not cached either.
#
# With EGRESSD_FAST=1 (bench/proxy-tls.sh EGRESSD=fast) it runs with
# --fast-path and its own firewall instead of --no-firewall (the peers
# script's REDIRECT is then not used for egressd: bench/egressd-fast-hook.sh).
#
# Environment: EGRESSD_BIN (the binary), EGRESSD_ENV (variables for the
# daemon only), SERVER_IP, GW_LAN (gwc) and GW_WAN (gws), the peers
# script's interface names; EGRESSD_KEEP, a directory the temporary one
# (policy, state directory with the event journal, dnsmasq's log) is
# copied into when the daemon has stopped, before it is removed. Stopping
# this script (TERM) stops both children by PID.
set -eu
PORT=$1
: "${EGRESSD_BIN:?}" "${SERVER_IP:?}"
DIR=$(mktemp -d /tmp/egressd-gw.XXXXXX)
cat >"$DIR/policy.yaml" <<POL
version: 1
mode: enforce
rules:
  - name: bench
    to: ["*.allowed.test"]
    ports: [443/tcp]
POL
dnsmasq -k --no-resolv --no-hosts --bind-interfaces --listen-address=127.0.0.1 --port=5353 \
	--address="/allowed.test/$SERVER_IP" --address=/allowed.test/2001:db8::2 --local-ttl=300 \
	--pid-file= >"$DIR/dnsmasq.log" 2>&1 &
DNSMASQ=$!
FW=--no-firewall
[ "${EGRESSD_FAST:-}" != 1 ] || FW=--fast-path
# shellcheck disable=SC2086 # EGRESSD_ENV is a list of VAR=value words
env ${EGRESSD_ENV:-} "$EGRESSD_BIN" run --policy "$DIR/policy.yaml" $FW \
	--proxy-listen ":$PORT" --explicit-proxy-listen off --lan "${GW_LAN:-gwc}" --wan "${GW_WAN:-gws}" \
	--upstream-dns 127.0.0.1:5353 --dns-listen :53 --state-dir "$DIR/state" --admin 127.0.0.1:9901 &
EGRESSD=$!
stop() {
	kill "$EGRESSD" "$DNSMASQ" 2>/dev/null || true
	wait "$EGRESSD" "$DNSMASQ" 2>/dev/null || true
	if [ -n "${EGRESSD_KEEP:-}" ]; then
		mkdir -p "$EGRESSD_KEEP" && cp -a "$DIR/." "$EGRESSD_KEEP/" || true
	fi
	rm -rf "$DIR"
	exit 0
}
trap stop TERM INT
wait "$EGRESSD" || true
stop
