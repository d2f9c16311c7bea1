#!/bin/sh
# egressd-fast-hook.sh - run by bench/proxy-tls.sh's copy of the peers
# script each time it moves its REDIRECT (EGRESSD=fast). egressd run
# --fast-path installs its own enforce ruleset (table inet egressd), which
# would take every system's connections; it is kept dormant (nft table flag)
# while another system is measured and made active again for egressd's
# rounds, with the client asking egressd's DNS for the allowed name first
# (the fast path takes only addresses the forwarder gave this client).
# Exit 0: egressd's turn (the caller adds no REDIRECT); 1: another system's.
#
# Environment (from the peers script): REDIRECT_PORT, HOOK_PORT (egressd's
# port), NS_G, NS_C, G1_IP, ALLOWED.
set -u
table_there() { ip netns exec "$NS_G" nft list table inet egressd >/dev/null 2>&1; }
# egressd installs its table once it runs: wait for it (up to 20 s), so a
# table that comes late is not left active under another system.
i=0
while ! table_there && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
table_there || { echo "egressd-fast-hook.sh: egressd installed no table" >&2; exit 1; }
if [ -n "$REDIRECT_PORT" ] && [ "$REDIRECT_PORT" = "$HOOK_PORT" ]; then
	ip netns exec "$NS_G" nft add table inet egressd
	ip netns exec "$NS_C" dig +short +tries=1 +time=2 @"$G1_IP" "$ALLOWED" A >/dev/null
	exit 0
fi
ip netns exec "$NS_G" nft add table inet egressd '{ flags dormant; }'
exit 1
