package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// buildEgressd builds the real binary once per test.
func buildEgressd(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "egressd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v: %s", err, out)
	}
	return bin
}

func digestLine(user, pass string) string {
	d := sha256.Sum256([]byte(pass))
	return user + ":sha256:" + hex.EncodeToString(d[:]) + "\n"
}

// bcryptLine is the line egressd proxy-users hash --cost 4 user prints
// for pass.
func bcryptLine(t *testing.T, user, pass string) string {
	t.Helper()
	var out, errb strings.Builder
	if code := proxyUsersHash([]string{"hash", "--cost", "4", user}, strings.NewReader(pass+"\n"), &out, &errb); code != exitOK {
		t.Fatalf("proxy-users hash: exit %d: %s", code, errb.String())
	}
	return out.String()
}

// TestRunProxyUsers runs the real binary with --proxy-users on loopback:
// the explicit proxy answers 407 to a CONNECT without credentials or with
// a wrong password, and decides by policy once the user is known (403 for
// a name the seed does not allow, with the policy named), for users given
// by bcrypt and by SHA-256 digest; each SHA-256 user draws one warning
// each time the file is read. Before, the proxy's authentication had no
// flag: `egressd run` always served an open explicit proxy; then it took
// SHA-256 digests only.
func TestRunProxyUsers(t *testing.T) {
	bin := buildEgressd(t)
	dir := t.TempDir()
	users := filepath.Join(dir, "users")
	if err := os.WriteFile(users, []byte("# explicit proxy users\n"+digestLine("alice", "s3cret")+"\n"+digestLine("bob", "other")+bcryptLine(t, "dave", "d4ve:pass")), 0o600); err != nil {
		t.Fatal(err)
	}
	r := startRun(t, bin, dir, "--mode", "enforce", "--explicit-proxy-listen", "127.0.0.1:0", "--proxy-users", users)
	cmd, out, errb := r.cmd, r.out, r.errb
	re := regexp.MustCompile(`(?m)^proxy: transparent on \S+, explicit on (127\.0\.0\.1:\d+) \(HTTP Basic authentication, 3 users\)$`)
	var addr string
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if m := re.FindStringSubmatch(out.String()); m != nil {
			addr = m[1]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no explicit proxy with authentication in 15s\nstdout:\n%s\nstderr:\n%s", out.String(), errb.String())
		}
	}
	ask := func(auth string) (int, string, http.Header) {
		t.Helper()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		req := "CONNECT tracker.example:443 HTTP/1.1\r\nHost: tracker.example:443\r\n"
		if auth != "" {
			req += "Proxy-Authorization: Basic " + auth + "\r\n"
		}
		io.WriteString(c, req+"\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: http.MethodConnect})
		if err != nil {
			t.Fatalf("CONNECT: %v", err)
		}
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), resp.Header
	}
	if code, body, h := ask(""); code != http.StatusProxyAuthRequired || h.Get("Proxy-Authenticate") != `Basic realm="egressd"` || !strings.Contains(body, "proxy authentication required") {
		t.Errorf("no credentials: %d %q %v; want 407 with a Basic challenge", code, body, h)
	}
	if code, _, _ := ask("YWxpY2U6d3Jvbmc="); code != http.StatusProxyAuthRequired { // alice:wrong
		t.Errorf("wrong password: %d, want 407", code)
	}
	// alice:s3cret; tracker.example is in no rule of the seed profile.
	if code, body, _ := ask("YWxpY2U6czNjcmV0"); code != http.StatusForbidden || !strings.Contains(body, "tracker.example") {
		t.Errorf("alice, a denied name: %d %q; want 403 naming it", code, body)
	}
	basic := func(user, pass string) string { return base64.StdEncoding.EncodeToString([]byte(user + ":" + pass)) }
	for range 2 { // the second from the cache
		if code, body, _ := ask(basic("dave", "d4ve:pass")); code != http.StatusForbidden || !strings.Contains(body, "tracker.example") {
			t.Errorf("dave (bcrypt), a denied name: %d %q; want 403 naming it", code, body)
		}
	}
	for _, wrong := range []string{"d4ve", "d4ve:passx", ""} {
		if code, _, _ := ask(basic("dave", wrong)); code != http.StatusProxyAuthRequired {
			t.Errorf("dave (bcrypt), password %q: %d, want 407", wrong, code)
		}
	}
	warned := func(user string) int {
		return strings.Count(errb.String(), `"msg":"proxy user has an unsalted sha256 digest; replace its line with the output of egressd proxy-users hash NAME","user":"`+user+`"`)
	}
	// The log lines are written in batches: wait for them.
	waitWarned := func(user string, n int) {
		for deadline := time.Now().Add(5 * time.Second); warned(user) < n && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		}
	}
	waitWarned("alice", 1)
	waitWarned("bob", 1)
	if warned("alice") != 1 || warned("bob") != 1 || warned("dave") != 0 {
		t.Errorf("unsalted warnings at the start: alice %d, bob %d, dave %d; want 1, 1, 0\nstderr:\n%s", warned("alice"), warned("bob"), warned("dave"), errb.String())
	}

	// SIGHUP reads the file again: carol comes in, bob goes; a file
	// egressd cannot use keeps them as they are.
	const carol, bob = "Y2Fyb2w6bmV3", "Ym9iOm90aGVy" // carol:new, bob:other
	if code, _, _ := ask(carol); code != http.StatusProxyAuthRequired {
		t.Fatalf("carol before the reload: %d, want 407", code)
	}
	reload := func(body string, wantCarol int) {
		t.Helper()
		if err := os.WriteFile(users, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if code, _, _ := ask(carol); code == wantCarol {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("10s after SIGHUP carol does not get %d\nstderr:\n%s", wantCarol, errb.String())
			}
		}
	}
	reload(digestLine("alice", "s3cret")+digestLine("carol", "new")+bcryptLine(t, "dave", "n3w"), http.StatusForbidden)
	if code, _, _ := ask(bob); code != http.StatusProxyAuthRequired {
		t.Errorf("bob after the reload that removed him: %d, want 407", code)
	}
	// dave's old password, accepted (and remembered) before, is not now.
	if code, _, _ := ask(basic("dave", "d4ve:pass")); code != http.StatusProxyAuthRequired {
		t.Errorf("dave's old password after the reload that changed it: %d, want 407", code)
	}
	if code, _, _ := ask(basic("dave", "n3w")); code != http.StatusForbidden {
		t.Errorf("dave's new password after the reload: %d, want 403", code)
	}
	waitWarned("alice", 2)
	waitWarned("carol", 1)
	if warned("alice") != 2 || warned("carol") != 1 || warned("bob") != 1 {
		t.Errorf("unsalted warnings after the reload: alice %d, carol %d, bob %d; want 2, 1, 1\nstderr:\n%s", warned("alice"), warned("carol"), warned("bob"), errb.String())
	}
	// A plain password: refused, carol stays. reload's wait for carol's
	// 403 holds before the reload has run (she had it already), and a
	// fixed 500 ms stood for the reload: a later one had carol asked
	// before it. Wait for the reload's own line, failed or not (written
	// after the users were, or were not, replaced), then ask.
	const failed, reloaded = "reload of the proxy users failed, keeping the running ones", `"msg":"proxy users reloaded"`
	lines := func() (failures, all int) {
		s := errb.String()
		f := strings.Count(s, failed)
		return f, f + strings.Count(s, reloaded)
	}
	before, beforeAll := lines()
	reload("carol:new\n", http.StatusForbidden)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, all := lines(); all > beforeAll {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no line of the proxy users' reload 10s after SIGHUP:\n%s", errb.String())
		}
	}
	if code, _, _ := ask(carol); code != http.StatusForbidden {
		t.Errorf("carol after a reload of an unusable file: %d, want 403 (the running users kept)", code)
	}
	if n, _ := lines(); n == before {
		t.Errorf("no error line for the unusable file:\n%s", errb.String())
	}
}

// TestRunProxyUsersRefused: a --proxy-users file egressd cannot use stops
// the start with an error naming the flag (and the line), never an open
// proxy.
func TestRunProxyUsersRefused(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode)
		return p
	}
	good := digestLine("alice", "s3cret")
	for _, c := range []struct {
		name, file string
		extra      []string
		want       string
		code       int
	}{
		{"readable by others", write("open", good, 0o644), nil, "chmod 600", exitFail},
		{"plain password", write("plain", "alice:s3cret\n", 0o600), nil, "plain:1: user \"alice\": expected bcrypt:HASH (egressd proxy-users hash alice) or sha256:HEX", exitFail},
		{"short digest", write("short", "# c\nalice:sha256:abcd\n", 0o600), nil, "short:2: user \"alice\": the digest is not 64 hex digits", exitFail},
		{"malformed bcrypt", write("badbcrypt", good+"bob:bcrypt:$2a$04$tooshort\n", 0o600), nil, "badbcrypt:2: user \"bob\": a bcrypt hash is $2a$, $2b$ or $2y$", exitFail},
		{"bcrypt cost", write("cost", "\n"+strings.Replace(bcryptLine(t, "bob", "x"), "$04$", "$31$", 1), 0o600), nil, "cost:2: user \"bob\": bcrypt cost 31 is outside 4..15", exitFail},
		{"unknown scheme", write("md5", "bob:md5:abc\n", 0o600), nil, "md5:1: user \"bob\": expected bcrypt:HASH", exitFail},
		{"twice", write("twice", good+good, 0o600), nil, "twice:2: user \"alice\" given twice", exitFail},
		{"no users", write("empty", "# nobody\n", 0o600), nil, "names no user", exitFail},
		{"missing", filepath.Join(dir, "none"), nil, "no such file", exitFail},
		{"explicit off", write("ok", good, 0o600), []string{"--explicit-proxy-listen", "off"}, "the explicit proxy is off", exitUsage},
	} {
		t.Run(c.name, func(t *testing.T) {
			var out, errb lockedBuffer
			args := append([]string{"--mode", "audit", "--lan", "lo", "--wan", "lo", "--no-firewall", "--proxy-users", c.file,
				"--dns-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
				"--upstream-dns", "127.0.0.1:9", "--state-dir", filepath.Join(dir, "state")}, c.extra...)
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second) // should it start after all
			defer cancel()
			code := cmdRun(ctx, args, &out, &errb)
			want := "egressd: --proxy-users: "
			wantCode := c.code
			if code != wantCode || !strings.Contains(errb.String(), want) || !strings.Contains(errb.String(), c.want) || strings.Contains(out.String(), "proxy:") {
				t.Errorf("exit %d, want %d at start with %q and %q\nstdout:\n%s\nstderr:\n%s", code, wantCode, want, c.want, out.String(), errb.String())
			}
		})
	}
}

// TestRunProxyUsersReloadBadPolicy: the users file does not depend on the
// policy, so SIGHUP reads it again when the policy file it reads with it
// is refused: carol, added to the file, gets in, while the running policy
// stays (she is refused a name it does not allow, 403). The log says each
// outcome. Before, a refused policy ended the reload before the users
// were read: the users file kept its old contents in force until a reload
// with a valid policy.
func TestRunProxyUsersReloadBadPolicy(t *testing.T) {
	bin := buildEgressd(t)
	dir := t.TempDir()
	users := filepath.Join(dir, "users")
	if err := os.WriteFile(users, []byte(digestLine("alice", "s3cret")), 0o600); err != nil {
		t.Fatal(err)
	}
	pol := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(pol, []byte("version: 1\nmode: enforce\nrules:\n  - name: docs\n    to: [docs.example]\n    ports: [443/tcp]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := startRun(t, bin, dir, "--policy", pol, "--explicit-proxy-listen", "127.0.0.1:0", "--proxy-users", users)
	cmd, out, errb := r.cmd, r.out, r.errb
	re := regexp.MustCompile(`(?m)^proxy: transparent on \S+, explicit on (127\.0\.0\.1:\d+) \(HTTP Basic authentication, 1 users\)$`)
	var addr string
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if m := re.FindStringSubmatch(out.String()); m != nil {
			addr = m[1]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no explicit proxy with authentication in 15s\nstdout:\n%s\nstderr:\n%s", out.String(), errb.String())
		}
	}
	const carol = "Y2Fyb2w6bmV3" // carol:new
	ask := func() int {
		t.Helper()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "CONNECT tracker.example:443 HTTP/1.1\r\nHost: tracker.example:443\r\nProxy-Authorization: Basic "+carol+"\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: http.MethodConnect})
		if err != nil {
			t.Fatalf("CONNECT: %v", err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := ask(); code != http.StatusProxyAuthRequired {
		t.Fatalf("carol before the reload: %d, want 407", code)
	}
	if err := os.WriteFile(pol, []byte("version: 1\nrules: [\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(users, []byte(digestLine("alice", "s3cret")+digestLine("carol", "new")), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(errb.String(), "reload failed, keeping the running policy"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("10s after SIGHUP no line for the refused policy\nstderr:\n%s", errb.String())
		}
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		code := ask()
		if code == http.StatusForbidden {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("10s after SIGHUP carol gets %d, want 403 (the users file read again, the running policy kept)\nstderr:\n%s", code, errb.String())
		}
	}
	if !strings.Contains(errb.String(), "proxy users reloaded") {
		t.Errorf("no line for the users reloaded:\n%s", errb.String())
	}
	// The report says the reload failed, and why, not only the log.
	m := regexp.MustCompile(`(?m)^admin: (http://127\.0\.0\.1:\d+)/`).FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("no admin line\nstdout:\n%s", out.String())
	}
	// Polled: the reload's outcome is recorded after the users are in.
	notes := func() string {
		resp, err := http.Get(m[1] + "/report.json")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var rep struct{ Notes []string }
		if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
			t.Fatal(err)
		}
		return strings.Join(rep.Notes, "\n")
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		n := notes()
		if strings.Contains(n, "the last policy reload at ") && strings.Contains(n, "("+pol+":") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("10s after SIGHUP the report's notes do not say the reload failed and why:\n%s", n)
		}
	}
}

// TestRunSIGHUPDuringStart: a SIGHUP that comes while egressd starts (a
// systemd reload, a script that saw the first line) waits and reloads once
// egressd runs. It ended the process when egressd listened for SIGHUP only
// after its parts had started (the signal's default action).
func TestRunSIGHUPDuringStart(t *testing.T) {
	bin := buildEgressd(t)
	dir := t.TempDir()
	r := startRun(t, bin, dir, "--explicit-proxy-listen", "off")
	cmd, out, errb, done := r.cmd, r.out, r.errb, r.done
	// The first line is printed before any part starts.
	for deadline := time.Now().Add(15 * time.Second); !strings.Contains(out.String(), "egressd "); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no first line in 15s\nstdout:\n%s\nstderr:\n%s", out.String(), errb.String())
		}
	}
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(15 * time.Second); !strings.Contains(errb.String(), `"msg":"policy reloaded"`); time.Sleep(20 * time.Millisecond) {
		select {
		case err := <-done:
			done <- err
			t.Fatalf("egressd run ended on a SIGHUP during its start: %v\nstdout:\n%s\nstderr:\n%s", err, out.String(), errb.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no reload 15s after a SIGHUP during the start\nstdout:\n%s\nstderr:\n%s", out.String(), errb.String())
		}
	}
	if !strings.Contains(out.String(), "admin: http://") {
		t.Errorf("egressd did not finish its start:\n%s", out.String())
	}
}

// runProc is `egressd run` started by startRun.
type runProc struct {
	cmd       *exec.Cmd
	out, errb *lockedBuffer
	done      chan error // the process's end; read it only to learn that it ended
}

// startRun starts bin's `egressd run` on loopback, with no firewall, its
// state under dir and args after the defaults (a later flag wins), and
// stops it with SIGINT when the test ends.
func startRun(t *testing.T, bin, dir string, args ...string) *runProc {
	t.Helper()
	r := &runProc{out: new(lockedBuffer), errb: new(lockedBuffer), done: make(chan error, 1)}
	r.cmd = exec.Command(bin, append([]string{"run", "--lan", "lo", "--wan", "lo", "--no-firewall",
		"--dns-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
		"--upstream-dns", "127.0.0.1:9", "--state-dir", filepath.Join(dir, "state")}, args...)...)
	r.cmd.Stdout, r.cmd.Stderr = r.out, r.errb
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { r.done <- r.cmd.Wait() }()
	t.Cleanup(func() {
		r.cmd.Process.Signal(os.Interrupt)
		select {
		case <-r.done:
		case <-time.After(20 * time.Second):
			r.cmd.Process.Kill()
			<-r.done
			t.Errorf("egressd run did not stop within 20s of SIGINT")
		}
	})
	return r
}

// TestProxyUsersHash: egressd proxy-users hash prints a line
// --proxy-users takes, for the first line of standard input, whose
// password the proxy then accepts; a name or password the line cannot
// hold is refused.
func TestProxyUsersHash(t *testing.T) {
	var out, errb strings.Builder
	if code := proxyUsersHash([]string{"hash", "alice"}, strings.NewReader("pa:ss word\r\nignored\n"), &out, &errb); code != exitOK {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	line := out.String()
	if !strings.HasPrefix(line, "alice:bcrypt:$2a$10$") || !strings.HasSuffix(line, "\n") || strings.Count(line, "\n") != 1 {
		t.Fatalf("line %q, want alice:bcrypt:$2a$10$... (the default cost)", line)
	}
	f := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(f, []byte(line), 0o600); err != nil {
		t.Fatal(err)
	}
	users, err := loadProxyUsers(f)
	if err != nil || !users["alice"].Salted() || users["alice"].Cost() != 10 {
		t.Fatalf("loadProxyUsers of the line: %v %v", users, err)
	}
	for _, c := range []struct {
		args  []string
		stdin string
		want  string
		code  int
	}{
		{[]string{"hash", "a:b"}, "x\n", "has a colon", exitUsage},
		{[]string{"hash", "#a"}, "x\n", "starts with #", exitUsage},
		{[]string{"hash"}, "x\n", "usage: egressd proxy-users hash", exitUsage},
		{[]string{"make", "a"}, "x\n", "usage: egressd proxy-users hash", exitUsage},
		{[]string{"hash", "--cost", "3", "a"}, "x\n", "--cost 3 is outside 4..15", exitUsage},
		{[]string{"hash", "a"}, "", "no password on standard input", exitFail},
		{[]string{"hash", "a"}, "\n", "no password on standard input", exitFail},
		{[]string{"hash", "a"}, strings.Repeat("x", 73) + "\n", "bcrypt takes at most 72", exitFail},
		{[]string{"hash", "a"}, strings.Repeat("x", 10000), "bcrypt takes at most 72", exitFail},
	} {
		var out, errb strings.Builder
		code := proxyUsersHash(c.args, strings.NewReader(c.stdin), &out, &errb)
		if code != c.code || !strings.Contains(errb.String(), c.want) || out.Len() != 0 {
			t.Errorf("%v < %.20q: exit %d %q %q, want %d and %q", c.args, c.stdin, code, out.String(), errb.String(), c.code, c.want)
		}
	}
}

// FuzzParseProxyUsers: the --proxy-users parser never panics, and what it
// accepts, written out again, reads back the same (names and secrets).
func FuzzParseProxyUsers(f *testing.F) {
	f.Add([]byte("alice:bcrypt:$2a$04$abcdefghijklmnopqrstuuN0Xs5l8QX8oMN3L6H3tbqE1I4yGUFy.\n"))
	f.Add([]byte("# users\n\nbob:sha256:" + strings.Repeat("ab", 32) + "\r\n  carol:bcrypt:$2y$10$abcdefghijklmnopqrstuuN0Xs5l8QX8oMN3L6H3tbqE1I4yGUFy.  \n"))
	f.Add([]byte("x:bcrypt:$2b$16$abcdefghijklmnopqrstuuN0Xs5l8QX8oMN3L6H3tbqE1I4yGUFy.\nx:sha256:00\n:\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		users, err := parseProxyUsers("f", b)
		if err != nil {
			if users != nil || !strings.HasPrefix(err.Error(), "--proxy-users: ") {
				t.Fatalf("refused with users %v, or error without the prefix: %v", users, err)
			}
			return
		}
		if len(users) == 0 {
			t.Fatal("accepted a file with no user")
		}
		text := formatProxyUsers(users)
		again, err := parseProxyUsers("f", text)
		if err != nil {
			t.Fatalf("its own output %q refused: %v", text, err)
		}
		if len(again) != len(users) {
			t.Fatalf("%d users, %d after a round trip of %q", len(users), len(again), text)
		}
		for n, s := range users {
			if a, ok := again[n]; !ok || a.Line() != s.Line() || a.Salted() != s.Salted() || a.Cost() != s.Cost() {
				t.Fatalf("user %q: %s, %s after a round trip", n, s.Line(), a.Line())
			}
		}
	})
}

// TestRunReloadBadUsersGoodPolicy: a reload whose policy is taken but
// whose --proxy-users file is refused. The report's note says the reload
// failed in part, and does not pass the policy just loaded for the one it
// replaced ("the running policy is still ..."), which the report's own
// rules contradict; the next reload that succeeds clears the note.
func TestRunReloadBadUsersGoodPolicy(t *testing.T) {
	bin := buildEgressd(t)
	dir := t.TempDir()
	users := filepath.Join(dir, "users")
	if err := os.WriteFile(users, []byte(digestLine("alice", "s3cret")), 0o600); err != nil {
		t.Fatal(err)
	}
	pol := filepath.Join(dir, "policy.yaml")
	const good = "version: 1\nmode: enforce\nrules:\n  - name: docs\n    to: [docs.example]\n    ports: [443/tcp]\n"
	if err := os.WriteFile(pol, []byte(good), 0o644); err != nil {
		t.Fatal(err)
	}
	r := startRun(t, bin, dir, "--policy", pol, "--explicit-proxy-listen", "127.0.0.1:0", "--proxy-users", users)
	cmd, out, errb := r.cmd, r.out, r.errb
	var admin string
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if m := regexp.MustCompile(`(?m)^admin: (http://127\.0\.0\.1:\d+)/`).FindStringSubmatch(out.String()); m != nil {
			admin = m[1]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no admin line in 15s\nstdout:\n%s\nstderr:\n%s", out.String(), errb.String())
		}
	}
	notes := func() string {
		t.Helper()
		resp, err := http.Get(admin + "/report.json")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var rep struct{ Notes []string }
		if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
			t.Fatal(err)
		}
		return strings.Join(rep.Notes, "\n")
	}
	hup := func(logLine string, n int) {
		t.Helper()
		if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(10 * time.Second); strings.Count(errb.String(), logLine) < n; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("10s after SIGHUP no %q line\nstderr:\n%s", logLine, errb.String())
			}
		}
	}
	// A new rule the report lists, and a users file with a bad line.
	if err := os.WriteFile(pol, []byte(good+"  - name: wiki\n    to: [wiki.example]\n    ports: [443/tcp]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(users, []byte(digestLine("alice", "s3cret")+"carol\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	hup("reload of the proxy users failed", 1)
	if !strings.Contains(errb.String(), `"msg":"policy reloaded"`) {
		t.Fatalf("the policy was not reloaded:\n%s", errb.String())
	}
	// Polled: the reload's outcome is recorded after its parts.
	n := notes()
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(n, "proxy users"); n = notes() {
		if time.Now().After(deadline) {
			t.Fatalf("10s after SIGHUP the report's notes do not say the users file was refused:\n%s", n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if strings.Contains(n, "the running policy is still") {
		t.Errorf("the report's note says the old policy still runs, but the reload's policy does:\n%s", n)
	}
	// Fixed: the next reload succeeds and the note goes.
	if err := os.WriteFile(users, []byte(digestLine("alice", "s3cret")), 0o600); err != nil {
		t.Fatal(err)
	}
	hup("proxy users reloaded", 1)
	for deadline := time.Now().Add(10 * time.Second); strings.Contains(n, "reload at "); n = notes() {
		if time.Now().After(deadline) {
			t.Fatalf("10s after a reload that succeeded the report still notes a failed one:\n%s", n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
