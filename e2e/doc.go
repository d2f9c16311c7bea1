// Package e2e is egressd's end-to-end suite. It has no code of its own:
// its tests build the real egressd binary, a LAN, a gateway and an
// "internet" out of network namespaces (internal/testnet), run real servers
// (nginx, unbound, Go TLS/UDP services) and real clients (curl, openssl
// s_client, dig, Go) through the gateway, and check what egressd lets
// through, what it blocks and what its report counts, in audit and in
// enforce mode, across reloads, restarts and kill -9.
//
// The binary is built with the tag egressd_e2e (TestMain): it adds the
// test hooks a few tests use to make a part fail for real
// (cmd/egressd/testhook_e2e.go), which egressd's own build has not.
//
// It needs root (network namespaces, nftables); in CI (CI set) it must run.
// All traffic stays inside the namespaces it creates, on 198.18.0.0/15,
// 203.0.113.0/24, 198.51.100.0/24 and 2001:db8::/32.
package e2e
