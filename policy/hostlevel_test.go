package policy

import "testing"

// TestHostLevel: the host-level engine has every rule without its
// host/path targets, so a host that only a host/path rule names is not
// allowed there, while a rule's plain names still are; engines WithMode
// makes share it.
func TestHostLevel(t *testing.T) {
	e, err := Compile("t.yaml", []byte(`version: 1
mode: audit
rules:
  - name: docs
    to: ["notion.test/nirovision/*", "docs.test"]
    ports: [80/tcp]
`))
	if err != nil {
		t.Fatal(err)
	}
	in := Input{Name: "notion.test", Port: 80, Proto: TCP}
	if !e.Decide(in).Allowed() {
		t.Fatal("the full engine does not allow the host at host level (no path)")
	}
	hl := e.HostLevel()
	if hl.Decide(in).Allowed() {
		t.Error("the host-level engine allows a host only a host/path rule names")
	}
	if d := hl.Decide(Input{Name: "docs.test", Port: 80, Proto: TCP}); !d.Allowed() || d.Rule != "docs" {
		t.Errorf("the host-level engine: docs.test %+v, want allowed by docs", d)
	}
	if e.WithMode(ModeEnforce).HostLevel() != hl || e.HostLevel() != hl {
		t.Error("the host-level engine is compiled again")
	}
}
