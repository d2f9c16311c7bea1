package policy

import (
	"strings"
	"testing"
)

// TestLintSharedTenantGlobs (THREATS.md B4): a glob whose suffix is a
// shared-tenant zone (user content on a provider's domain: S3 buckets,
// GitHub Pages, Workers, CloudFront, Blogspot) is warned about, as is one
// at a public suffix; a vendor's own zone is not. A wildcard-DNS zone is
// an error (D5).
func TestLintSharedTenantGlobs(t *testing.T) {
	for _, c := range []struct {
		glob string
		warn bool
	}{
		{"*.s3.amazonaws.com", true},
		{"*.github.io", true},
		{"*.workers.dev", true},
		{"*.cloudfront.net", true},
		{"*.blogspot.com", true},
		{"*.herokuapp.com", true},
		{"*.co.uk", true},
		{"*.nirovision.com", false},
		{"*.docker.io", false},
		{"vendor.github.io", false},
	} {
		e := mustCompile(t, "version: 1\nrules:\n  - name: r\n    to: [\""+c.glob+"\"]\n    ports: [443/tcp]\n")
		got := false
		for _, w := range e.Warnings() {
			if strings.Contains(w.Msg, "public suffix") {
				got = true
			}
		}
		if got != c.warn {
			t.Errorf("%s: public-suffix warning %v, want %v (%v)", c.glob, got, c.warn, e.Warnings())
		}
	}
	for _, z := range []string{"*.nip.io", "*.sslip.io", "*.a.nip.io", "x-*.nip.io"} {
		if _, err := Compile("t.yaml", []byte("version: 1\nrules:\n  - name: r\n    to: [\""+z+"\"]\n    ports: [443/tcp]\n")); err == nil || !strings.Contains(err.Error(), "wildcard-DNS") {
			t.Errorf("%s: %v, want a wildcard-DNS error", z, err)
		}
	}
}
