package proxy

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"egressd/internal/testnet"
	"egressd/policy"
)

// TestPathForms drives curl --path-as-is through the gateway (explicit and
// transparent, plain HTTP and inspected TLS) to Debian's nginx and to Go's
// http.FileServer, both serving a /public/ and a /private/ tree, under
// host/path rules, with each spelling of a path: escaped unreserved
// characters in either hex case, encoded slashes and percents, "//",
// "/./", a trailing "/.", ';' parameters, a query, case. A request is
// allowed only where every origin serves the file the rule names (never
// one of /private/), and one that the origins decode to an allowed path
// is allowed however its unreserved characters are spelled, the same in
// every mode (the policy matches policy.NormalPath of the path as sent).
func TestPathForms(t *testing.T) {
	nginx, err := execLookPath("nginx")
	if err != nil {
		t.Fatal("nginx (Debian package nginx) is needed for this test")
	}
	if _, err := execLookPath("curl"); err != nil {
		t.Fatal("curl is needed for this test")
	}
	tp := newTopo(t, topoOpts{})
	eng, err := policy.Compile("test.yaml", []byte(`version: 1
mode: enforce
rules:
  - name: files
    to: ["docs.paths.test/public/*", "docs.paths.test/caf%C3%A9/*", "docs.paths.test/%7euser/*"]
    ports: [8180/tcp, 8181/tcp, 8182/tcp, 8183/tcp]
`))
	if err != nil {
		t.Fatal(err)
	}
	tp.store.Swap(eng)

	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	for name, body := range map[string]string{
		"public/x": "PUBLIC-x", "public/x;v=1": "PUBLIC-semi", "private/x": "PRIVATE-x", "Public/x": "PRIVATE-caps",
		"pUBLIC/x": "PRIVATE-pUBLIC", "caf\xc3\xa9/x": "CAFE-x", "~user/x": "USER-x",
	} {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	certFile, keyFile := filepath.Join(dir, "leaf.pem"), filepath.Join(dir, "leaf.key")
	keyDER, err := x509.MarshalECPrivateKey(tp.pki.srvCert.PrivateKey.(*ecdsa.PrivateKey))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: tp.pki.srvCert.Certificate[0]}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)
	conf := fmt.Sprintf(`user root;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/nginx-error.log warn;
events { worker_connections 64; }
http {
	access_log %[1]s/nginx-access.log;
	client_body_temp_path %[1]s/b;
	proxy_temp_path %[1]s/p;
	fastcgi_temp_path %[1]s/f;
	uwsgi_temp_path %[1]s/u;
	scgi_temp_path %[1]s/s;
	default_type text/plain;
	server {
		listen 198.18.2.2:8180;
		listen 198.18.2.2:8181 ssl;
		ssl_certificate %[1]s/leaf.pem;
		ssl_certificate_key %[1]s/leaf.key;
		root %[1]s/root;
		location / { }
	}
}
`, dir)
	os.WriteFile(filepath.Join(dir, "nginx.conf"), []byte(conf), 0o600)
	ng := tp.s.Start(nginx, "-c", filepath.Join(dir, "nginx.conf"), "-p", dir, "-e", filepath.Join(dir, "nginx-error.log"), "-g", "daemon off;")
	if err := tp.s.WaitTCP("198.18.2.2:8180", 10*time.Second); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "nginx-error.log"))
		t.Fatalf("nginx: %v\nstderr: %s\nlog: %s", err, ng.Stderr, log)
	}
	fsPlain, err := tp.s.Listen("tcp", "198.18.2.2:8182")
	if err != nil {
		t.Fatal(err)
	}
	fsTLS, err := tp.s.Listen("tcp", "198.18.2.2:8183")
	if err != nil {
		t.Fatal(err)
	}
	fs := &http.Server{Handler: http.FileServer(http.Dir(root))}
	fst := &http.Server{Handler: http.FileServer(http.Dir(root)), TLSConfig: &tls.Config{Certificates: []tls.Certificate{tp.pki.srvCert}}}
	go fs.Serve(fsPlain)
	go fst.ServeTLS(fsTLS, "", "")
	t.Cleanup(func() { fs.Close(); fst.Close() })

	_, caPEM, err := LoadOrCreateCA(tp.state)
	if err != nil {
		t.Fatal(err)
	}
	testCA, _ := os.ReadFile(tp.pki.caFile)
	bundle := filepath.Join(dir, "bundle.pem")
	os.WriteFile(bundle, append(append([]byte{}, caPEM...), testCA...), 0o644)

	const path, form, refused = policy.ReasonPath, ReasonPathForm, "refused"
	forms := []struct{ path, want string }{
		{"/public/x", "PUBLIC-x"},
		// Unreserved characters escaped: the origins decode them.
		{"/%70ublic/x", "PUBLIC-x"},
		{"/publi%63/%78", "PUBLIC-x"},
		{"/%70%75%62%6c%69%63/x", "PUBLIC-x"},
		{"/%70%75%62%6C%69%63/x", "PUBLIC-x"},
		{"/caf%c3%a9/x", "CAFE-x"},
		{"/caf%C3%A9/x", "CAFE-x"},
		{"/~user/x", "USER-x"},
		{"/%7Euser/x", "USER-x"},
		// Case is the path's: nginx serves /Public and /pUBLIC.
		{"/%70UBLIC/x", path},
		{"/%50ublic/x", path},
		{"/Public/x", path},
		// Slashes and parameters as spelled.
		{"/public//x", "PUBLIC-x"},
		{"//public/x", path},
		{"/public/x;v=1", "PUBLIC-semi"},
		{"/public;/x", path},
		{"/public/x?q=/private/x", "PUBLIC-x"},
		// A reserved escape is not decoded: the origins differ on it.
		{"/public%2fx", path},
		{"/public%2Fx", path},
		{"/%70rivate/x", path},
		{"/private/x", path},
		// Read by an origin as another path.
		{"/public/./x", form},
		{"/public/x/.", form},
		{"/public/../private/x", form},
		{"/public/%2e%2e/private/x", form},
		{"/public/%2E%2E/private/x", form},
		{"/public/..%2fprivate/x", form},
		{"/public/%252e%252e/private/x", form},
		{"/public/%c0%ae%c0%ae/private/x", form},
		{"/public/%e0%80%ae%e0%80%ae/private/x", form},
		// path-form where the proxy reads the head itself (transparent
		// plain HTTP); net/http refuses "%u" before (explicit, inspected).
		{"/public/%u002e%u002e/private/x", refused},
		{"/public/..;/private/x", form},
		// A fragment is not sent (curl drops it).
		{"/public/x#/../../private/x", "PUBLIC-x"},
		// Allowed, but no escape: the origins refuse it.
		{"/public/%zz", ""},
	}
	result := regexp.MustCompile(`(?s)(.*?)\n@@(\d{3})@@\n`)
	for _, mode := range []struct {
		name string
		args []string
	}{
		{"explicit", []string{"-x", fmt.Sprintf("http://198.18.1.1:%d", explicitPort)}},
		{"transparent", []string{"--resolve", "docs.paths.test:8180:198.18.2.2", "--resolve", "docs.paths.test:8181:198.18.2.2",
			"--resolve", "docs.paths.test:8182:198.18.2.2", "--resolve", "docs.paths.test:8183:198.18.2.2"}},
	} {
		for _, origin := range []struct {
			name   string
			scheme string
			port   int
		}{{"nginx", "http", 8180}, {"nginx", "https", 8181}, {"fileserver", "http", 8182}, {"fileserver", "https", 8183}} {
			args := append([]string{"curl", "-s", "--path-as-is", "--max-time", "10", "--cacert", bundle, "-w", "\n@@%{http_code}@@\n"}, mode.args...)
			for _, f := range forms {
				args = append(args, fmt.Sprintf("%s://docs.paths.test:%d%s", origin.scheme, origin.port, f.path))
			}
			out, _ := tp.c.Run(args...)
			got := result.FindAllStringSubmatch(out, -1)
			if len(got) != len(forms) {
				t.Fatalf("%s %s %s: %d results for %d requests:\n%s", mode.name, origin.name, origin.scheme, len(got), len(forms), out)
			}
			for i, f := range forms {
				body, code := got[i][1], got[i][2]
				what := fmt.Sprintf("%s %s %s %s", mode.name, origin.name, origin.scheme, f.path)
				switch {
				case strings.Contains(body, "PRIVATE"):
					t.Errorf("%s: the origin served another file than the rule names: %s %q", what, code, body)
				case f.want == "":
					if code == "200" || code == "403" {
						t.Errorf("%s: %s %q, want the origin's refusal", what, code, body)
					}
				case f.want == refused:
					if code == "200" {
						t.Errorf("%s: %s %q, want a refusal", what, code, body)
					}
				case f.want == path || f.want == form:
					if code != "403" || !strings.Contains(body, f.want) {
						t.Errorf("%s: %s %q, want 403 %s", what, code, body, f.want)
					}
				case code != "200" || strings.TrimSpace(body) != f.want:
					t.Errorf("%s: %s %q, want 200 %s", what, code, body, f.want)
				}
			}
		}
	}
	testRawPaths(t, tp, bundle)
}

// testRawPaths sends request targets with raw bytes 0x80 and above (curl
// escapes them, in lower case) on sockets of its own, in every mode: the
// transparent listener (plain HTTP, inspected TLS) and the explicit proxy
// (absolute form, CONNECT then inspected TLS), to nginx and to Go's
// http.FileServer. The origins serve raw UTF-8 ("/caf\xc3\xa9/x") as the
// file its escapes name; the gateway refuses it in every mode
// (http-malformed), as no browser or curl sends it.
func testRawPaths(t *testing.T, tp *topo, bundle string) {
	pool := x509.NewCertPool()
	pem, _ := os.ReadFile(bundle)
	pool.AppendCertsFromPEM(pem)
	forms := []struct{ path, code, want string }{
		{"/caf\xc3\xa9/x", "200", "CAFE-x"},
		{"/caf\xc3\xa9", "301", ""}, // a directory
		{"/public/\xc0\xae\xc0\xae/private/x", "404", ""},
	}
	// The origins serve raw UTF-8 as the file its escapes name.
	for _, port := range []int{8180, 8182} {
		for _, f := range forms {
			code, body, err := rawGet(tp.s, nil, false, false, fmt.Sprintf("198.18.2.2:%d", port), port, f.path)
			if err != nil || code != f.code || !strings.Contains(body, f.want) {
				t.Errorf("origin :%d %q: %s %q %v, want %s %s", port, f.path, code, body, err, f.code, f.want)
			}
		}
	}
	// The gateway refuses them in every mode: the proxy reads no raw
	// byte 0x80 or above in a request target (http-malformed).
	forms = []struct{ path, code, want string }{
		{"/caf\xc3\xa9/x", "403", ReasonHTTPBad},
		{"/caf\xc3\xa9", "403", ReasonHTTPBad},
		{"/public/\xc0\xae\xc0\xae/private/x", "403", ReasonHTTPBad},
		{"/public/\xe0\x80\xae\xe0\x80\xae/private/x", "403", ReasonHTTPBad},
		// In the query too: curl 7.88 sends a query's raw bytes as given.
		{"/public/x?q=caf\xc3\xa9", "403", ReasonHTTPBad},
	}
	for _, mode := range []string{"explicit", "transparent"} {
		for _, o := range []struct {
			name string
			tls  bool
			port int
		}{{"nginx", false, 8180}, {"nginx", true, 8181}, {"fileserver", false, 8182}, {"fileserver", true, 8183}} {
			for _, f := range forms {
				what := fmt.Sprintf("%s %s tls=%v %q", mode, o.name, o.tls, f.path)
				addr := fmt.Sprintf("198.18.2.2:%d", o.port)
				if mode == "explicit" {
					addr = fmt.Sprintf("198.18.1.1:%d", explicitPort)
				}
				code, body, err := rawGet(tp.c, pool, mode == "explicit", o.tls, addr, o.port, f.path)
				if err != nil {
					t.Errorf("%s: %v", what, err)
					continue
				}
				if code != f.code || !strings.Contains(body, f.want) || strings.Contains(body, "PRIVATE") {
					t.Errorf("%s: %s %q, want %s %s", what, code, body, f.code, f.want)
				}
			}
		}
	}
}

// rawGet sends one GET of path, as bytes, for docs.paths.test:port from
// namespace ns to addr (the origin, the explicit proxy or, through the
// transparent listener, the origin), in TLS or not, and returns the answer's status and body.
func rawGet(ns *testnet.NS, pool *x509.CertPool, explicit, useTLS bool, addr string, port int, path string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	authority := fmt.Sprintf("docs.paths.test:%d", port)
	dial := func() (*net.TCPConn, error) {
		c, err := ns.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}
	var c net.Conn
	if useTLS && !explicit {
		// Through the transparent listener: dialed at the ClientHello
		// (as dialAtFirstWrite), not before its key shares.
		c = &firstWriteConn{dial: dial}
	} else {
		tc, err := dial()
		if err != nil {
			return "", "", err
		}
		c = tc
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	target := path
	if explicit && !useTLS {
		target = "http://" + authority + path
	}
	if explicit && useTLS {
		fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", authority, authority)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return "", "", err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Sprint(resp.StatusCode), "", nil
		}
	}
	var rw io.ReadWriter = struct {
		io.Reader
		io.Writer
	}{br, c}
	if useTLS {
		// Nothing follows the CONNECT answer before the handshake.
		tc := tls.Client(c, &tls.Config{ServerName: "docs.paths.test", RootCAs: pool})
		rw, br = tc, bufio.NewReader(tc)
	}
	if _, err := fmt.Fprintf(rw, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", target, authority); err != nil {
		return "", "", err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return "", "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	return fmt.Sprint(resp.StatusCode), string(b), nil
}
