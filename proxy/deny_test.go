package proxy

import (
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"egressd/policy"
)

// TestDenyPageNamesPolicyNotPath: the 403 page a LAN client gets names the
// policy (its file's base name without .yaml, or the profile's name), never
// where the file lies on the gateway.
func TestDenyPageNamesPolicyNotPath(t *testing.T) {
	for _, c := range []struct{ file, want string }{
		{"/etc/egressd/secret-dir/site-policy.yaml", "site-policy"},
		{"/srv/x/lab.yml", "lab"},
		{"relative/dir/office", "office"},
		{"profile:nirovision", "nirovision"},
	} {
		eng, err := policy.Compile(c.file, []byte(fmt.Sprintf(testPolicy, "enforce")))
		if err != nil {
			t.Fatal(err)
		}
		p, err := New(Config{}, Deps{Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		info := DenyInfo{Host: "evil.example", Path: "/x", Client: "198.18.0.9", Reason: policy.ReasonNoRule}
		resp := p.denyResponse(&http.Request{}, info)
		b, _ := io.ReadAll(resp.Body)
		for what, body := range map[string]string{"transparent": string(p.httpDeny(info)), "explicit": string(b)} {
			if !strings.Contains(body, "<code>"+c.want+"</code>") || !strings.Contains(body, "evil.example/x") {
				t.Errorf("%s: %s: page does not name policy %q and what was blocked:\n%s", c.file, what, c.want, body)
			}
			if strings.Contains(body, "/etc") || strings.Contains(body, "dir") || strings.Contains(body, ".y") || strings.Contains(body, "profile:") {
				t.Errorf("%s: %s: page shows the file's path:\n%s", c.file, what, body)
			}
		}
	}
}
