package proxy

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestInspectCAReadOnlyStateDir: with inspection on and no CA yet, on a
// state directory that is read-only (a card the kernel remounted
// read-only): the proxy cannot make the CA, says why (the path and the
// errno: what the start's line carries), its expiry metric is 1, and an
// inspected connection fails closed (enforce: 403
// inspection-unavailable), while the proxy goes on serving. Once the
// directory is writable, the next inspected connection makes the CA
// there and is inspected with it. (The code did this before; no test
// showed it on a read-only directory.)
func TestInspectCAReadOnlyStateDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("a tmpfs mount needs root")
	}
	dir := t.TempDir()
	mount := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("mount", args...).CombinedOutput(); err != nil {
			t.Fatalf("mount %v: %v: %s", args, err, out)
		}
	}
	mount("-t", "tmpfs", "-o", "size=4m,mode=0700,ro", "tmpfs", dir)
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
			exec.Command("umount", "-l", dir).Run()
		}
	})
	was := caCheckEvery
	caCheckEvery = time.Hour
	defer func() { caCheckEvery = was }()
	addr, plainPort, tlsPort, _, p := loopbackExplicitProxy(t, docsPublicPolicy, func(c *Config) { c.StateDir = dir }, nil, nil)

	if _, err := p.ensureCA(); err == nil || !strings.Contains(err.Error(), "read-only file system") || !strings.Contains(err.Error(), dir) {
		t.Errorf("the CA on a read-only directory: %v, want the path and \"read-only file system\"", err)
	}
	if e := p.caExpiry(); e != 1 {
		t.Errorf("CA expiry metric %v while no CA can be made, want 1", e)
	}
	for i := range 2 {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(20 * time.Second))
		auth := fmt.Sprintf("docs.paths.test:%d", tlsPort)
		fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", auth, auth)
		resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: http.MethodConnect})
		checkRefused(t, fmt.Sprintf("inspected CONNECT %d on a read-only directory (fail closed)", i), resp, err, http.StatusForbidden, "inspection-unavailable")
		conn.Close()
	}
	// The rest is served: a plain request the policy allows.
	proxyURL, _ := url.Parse("http://" + addr)
	client := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(proxyURL)}, Timeout: 20 * time.Second}
	if resp, err := client.Get(fmt.Sprintf("http://docs.paths.test:%d/public/ro", plainPort)); err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("plain request through the proxy on a read-only directory: %v %v, want 200", resp, err)
	} else {
		resp.Body.Close()
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("files in the read-only directory: %v", ents)
	}

	mount("-o", "remount,rw", dir)
	conn, _ := inspectDocs(t, addr, tlsPort, nil)
	// The CA is made by this connection: trusted as read from the
	// directory once the handshake shows the leaf.
	var chain []*x509.Certificate
	tc := tls.Client(conn, &tls.Config{ServerName: "docs.paths.test", InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error { chain = cs.PeerCertificates; return nil }})
	if err := tc.Handshake(); err != nil {
		t.Fatalf("inspected connection once the directory is writable: %v", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		t.Fatalf("no CA in the directory once writable: %v", err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	if _, err := chain[0].Verify(x509.VerifyOptions{DNSName: "docs.paths.test", Roots: pool}); err != nil {
		t.Errorf("the leaf is not the new CA's: %v", err)
	}
	fmt.Fprintf(tc, "GET /public/ro HTTP/1.1\r\nHost: docs.paths.test:%d\r\n\r\n", tlsPort)
	resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("inspected request once writable: %v %v, want 200", resp, err)
	}
	if e := p.caExpiry(); e <= float64(time.Now().Unix()) {
		t.Errorf("CA expiry metric %v once the CA is made, want its end", e)
	}
}
