package audit

import (
	"bytes"
	"slices"
	"strings"
	"testing"
)

// TestAllowedNowInTextAndHTML: the text and HTML reports mark a dropped
// entry the running policy allows now as the JSON does (allowed_now),
// the HTML escaped as the rest of the page; an entry still denied is
// not marked.
func TestAllowedNowInTextAndHTML(t *testing.T) {
	l := NewLedger(compileBase(t, ""), LedgerOptions{})
	deny := captureDenials(l)
	deny("tracker.example", "192.168.50.23", "aa:bb:cc:00:00:0a")
	deny("still.example", "192.168.50.30", "")
	l.SetPolicy(compileBase(t, `  - name: allow-tracker
    to: ["tracker.example"]
    ports: [443/tcp]
`))
	r := l.Report(ReportOptions{Now: reportNow})
	var text, page bytes.Buffer
	if err := r.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	const mark = "(allowed now by rule allow-tracker)"
	var marked []string
	for _, line := range strings.Split(text.String(), "\n") {
		if strings.Contains(line, mark) {
			marked = append(marked, strings.Fields(line)[0])
		}
	}
	if !slices.Equal(marked, []string{"tracker.example"}) {
		t.Errorf("text lines marked %q: %q, want only tracker.example's\n%s", mark, marked, text.String())
	}

	// A report read back from JSON can carry any text: the HTML escapes it.
	for i := range r.Dropped {
		if r.Dropped[i].AllowedNow != "" {
			r.Dropped[i].AllowedNow = "allow-<b>&"
		}
	}
	if err := r.WriteHTML(&page); err != nil {
		t.Fatal(err)
	}
	html := page.String()
	if want := "(allowed now by rule allow-&lt;b&gt;&amp;)"; strings.Count(html, want) != 1 {
		t.Errorf("the HTML page shows %q %d times, want once (tracker.example's row)", want, strings.Count(html, want))
	}
	if strings.Contains(html, "<b>") {
		t.Error("the HTML page has the rule name unescaped")
	}
	for _, row := range strings.Split(html, "<tr>") {
		if strings.Contains(row, "still.example") && strings.Contains(row, "allowed now") {
			t.Errorf("still.example, which the running policy denies, is marked: %s", row)
		}
	}
}
