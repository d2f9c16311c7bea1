package audit

import (
	"fmt"
	"html/template"
	"io"
	"slices"

	"egressd/policy"
)

// WriteHTML writes the report as one self-contained page: inline CSS and an
// inline SVG bar chart of rule use, no scripts, no fonts, no external
// resources of any kind (the page is served by the admin API and saved by
// `egressd report --html`, often to be mailed around).
//
// The chart has one bar (an SVG <g class="bar">) per used rule, carrying
// data-rule, data-flows and data-queries attributes, so tests and scripts
// can read the numbers back.
func (r *Report) WriteHTML(w io.Writer) error {
	const barArea = 520.0
	var maxUse uint64
	for _, u := range r.Rules {
		maxUse = max(maxUse, u.Flows+u.Queries)
	}
	type bar struct {
		RuleReport
		Y, FlowW, QueryW, LabelY float64
	}
	bars := make([]bar, len(r.Rules))
	for i, u := range r.Rules {
		b := bar{RuleReport: u, Y: float64(i) * 26, LabelY: float64(i)*26 + 15}
		if maxUse > 0 {
			b.FlowW = barArea * float64(u.Flows) / float64(maxUse)
			b.QueryW = barArea * float64(u.Queries) / float64(maxUse)
		}
		// Keep a used rule visible even when tiny beside the largest.
		if b.FlowW+b.QueryW < 2 {
			if u.Flows > 0 {
				b.FlowW = 2
			} else {
				b.QueryW = 2
			}
		}
		bars[i] = b
	}
	data := struct {
		*Report
		Bars        []bar
		ChartHeight int
		Audit       bool
		Requests    bool // a Requests column: some were counted
		MACs        bool // a Devices column: some client had a MAC
		Withheld    bool // some rule's answers were withheld: a note on each
	}{r, bars, len(r.Rules)*26 + 4, r.Mode == policy.ModeAudit, r.Totals.Requests > 0, r.anyMACs(), slices.ContainsFunc(r.Rules, func(u RuleReport) bool { return u.AnswersWithheld > 0 })}
	if err := htmlTmpl.Execute(w, data); err != nil {
		return fmt.Errorf("audit: write html report: %w", err)
	}
	return nil
}

var htmlTmpl = template.Must(template.New("report").Funcs(template.FuncMap{
	"withheld": withheldNote,
	"time":     fmtTime,
	"bytes":    fmtBytes,
	"count":    fmtCount,
	"enforced": func(d DroppedReport) string { return d.enforcedText() },
	"port":     func(d DroppedReport) string { return d.portText() },
	"ips":      func(d DroppedReport) string { return d.ipsText() },
	"reason":   func(d DroppedReport) string { return d.reasonText() },
	"plural":   func(n uint64, one, many string) string { return plural(n, one, many) },
	"date":     expiresDate,
	"add":      func(a, b float64) float64 { return a + b },
	"sum":      func(a, b uint64) uint64 { return a + b },
	"clients":  func(d ClientDevices, clients []string) []string { return d.clientTexts(clients) },
}).Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>egressd report</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em;color:#1d2330;background:#fff}
h1{font-size:1.5em;margin-bottom:.2em}
h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #d7dbe3;padding-bottom:.2em}
.meta{color:#5a6272}
.warn{background:#fff3cd;border:1px solid #e0c46c;padding:.5em .8em;border-radius:4px}
table{border-collapse:collapse;font-size:.9em}
th,td{text-align:left;padding:.25em .8em .25em 0;border-bottom:1px solid #eceff4;vertical-align:top}
th{color:#5a6272;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
svg text{font-size:12px;fill:#1d2330}
.flows{fill:#3568d4}.queries{fill:#9bb5ec}
.enforced{color:#a3261b;font-weight:600}
code{font-family:ui-monospace,Menlo,Consolas,monospace}
</style>
</head>
<body>
<h1>egressd report</h1>
<p class="meta">Mode <strong id="mode">{{if .Mode}}{{.Mode}}{{else}}unknown{{end}}</strong>{{if .Policy}} · policy <code>{{.Policy}}</code>{{end}} · generated {{time .GeneratedAt}}{{if .Since}} · since {{time .Since}}{{end}}</p>
<p class="meta" id="totals">{{plural .Totals.Flows "flow" "flows"}} ({{.Totals.Allowed}} allowed, {{.Totals.Dropped}} {{if .Audit}}would be dropped{{else}}dropped{{end}}), {{plural .Totals.Queries "DNS query" "DNS queries"}}, <span id="shed">{{.ShedEvents}}</span> {{if eq .ShedEvents 1}}event{{else}}events{{end}} shed.</p>
{{if .ShedEvents}}<p class="warn">{{plural .ShedEvents "event was" "events were"}} shed because the event log could not keep up; they are in no count on this page.</p>{{end}}
{{if .UnwrittenEvents}}<p class="warn" id="unwritten">{{plural .UnwrittenEvents "event" "events"}} could not be written to the event log (disk full?); they are counted here but will be missing after a restart.</p>{{end}}
{{with .Coverage}}<p class="meta" id="coverage">Covers every event since {{time .DetailFrom}} in full detail{{with .RotatedOut}}; before that, {{plural .Events "event" "events"}} of {{plural .Files "file" "files"}} rotated out of it ({{time .From}} to {{time .Until}}) are counted from a summary: counts and first/last seen, not the events{{end}}.</p>{{end}}
{{range .Notes}}<p class="warn">{{.}}</p>{{end}}

<h2>Rule use</h2>
{{if .Bars}}
<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="900" height="{{.ChartHeight}}" role="img" aria-label="flows per rule">
{{range .Bars}}<g class="bar" data-rule="{{.Name}}" data-flows="{{.Flows}}" data-queries="{{.Queries}}">
<text x="0" y="{{.LabelY}}">{{.Name}}</text>
<rect class="flows" x="200" y="{{.Y}}" width="{{printf "%.1f" .FlowW}}" height="20"></rect>
<rect class="queries" x="{{printf "%.1f" (add 200 .FlowW)}}" y="{{.Y}}" width="{{printf "%.1f" .QueryW}}" height="20"></rect>
<text x="{{printf "%.1f" (add 206 (add .FlowW .QueryW))}}" y="{{.LabelY}}">{{plural .Flows "flow" "flows"}}{{if .Queries}}, {{plural .Queries "query" "queries"}}{{end}}</text>
</g>
{{end}}</svg>
<p class="meta"><svg width="10" height="10"><rect class="flows" width="10" height="10"></rect></svg> flows <svg width="10" height="10"><rect class="queries" width="10" height="10"></rect></svg> DNS queries</p>
<table id="rules">
<thead><tr><th>Rule</th><th>Flows</th><th>Queries</th>{{if $.Requests}}<th>Requests</th>{{end}}<th>Out</th><th>In</th><th>Clients</th>{{if $.MACs}}<th>Devices</th>{{end}}<th>Top destinations</th><th>First seen</th><th>Last seen</th></tr></thead>
<tbody>
{{range .Rules}}<tr data-rule="{{.Name}}"><td>{{.Name}}{{if not .InPolicy}} <em>(not in policy)</em>{{end}}</td><td class="n flows">{{.Flows}}</td><td class="n">{{.Queries}}</td>{{if $.Requests}}<td class="n requests">{{.Requests}}</td>{{end}}<td class="n">{{bytes .BytesOut}}</td><td class="n">{{bytes .BytesIn}}</td><td class="clients">{{template "clients" .}}</td>{{if $.MACs}}<td class="n devices">{{count .DeviceCount .DevicesTruncated}}</td>{{end}}<td>{{range $i, $d := .TopDestinations}}{{if $i}}, {{end}}{{$d.Dest}} ({{$d.Count}}){{end}}</td><td>{{time .FirstSeen}}</td><td>{{time .LastSeen}}</td></tr>
{{end}}</tbody>
</table>
{{if $.Withheld}}<ul id="answers-withheld">{{range .Rules}}{{if .AnswersWithheld}}<li data-rule="{{.Name}}">{{.Name}}: {{withheld .}}</li>{{end}}{{end}}</ul>
{{end}}{{else}}<p id="no-rules">No rule has been used yet.</p>{{end}}

<h2>Unused rules ({{len .UnusedRules}})</h2>
{{if .UnusedRules}}<ul id="unused">{{range .UnusedRules}}<li>{{.}}</li>{{end}}</ul>{{else}}<p>Every rule has been used.</p>{{end}}
{{if .UsedBeforeDetail}}
<h2>Used in the window before the detailed log begins ({{len .UsedBeforeDetail}})</h2>
<ul id="used-before-detail">{{range .UsedBeforeDetail}}<li>{{.Name}}{{if not .InPolicy}} <em>(not in policy)</em>{{end}}: last seen {{time .LastSeen}}; {{plural .Uses "flow, query or request" "flows, queries and requests"}} in the summary of rotated-out files</li>{{end}}</ul>
{{end}}{{if .ExpiredRules}}
<h2>Expired rules ({{len .ExpiredRules}})</h2>
<ul id="expired">{{range .ExpiredRules}}<li>{{.Name}}: expires: {{date .Expires}}, {{plural .Flows "flow" "flows"}} denied that only it would allow</li>{{end}}</ul>
{{end}}

{{if .Alarms}}
<h2>Alarms ({{len .Alarms}})</h2>
<ul id="alarms">{{range .Alarms}}<li>{{.Reason}}: {{if .Client}}{{.Client}}{{else}}all clients{{end}}{{if .ClientMAC}} ({{.ClientMAC}}){{end}}{{if .TopClients}} (most names from {{range $i, $c := .TopClients}}{{if $i}}, {{end}}{{$c}}{{end}}){{end}}, zone {{.Zone}}: {{plural .DistinctNames "distinct name" "distinct names"}} in a window ({{plural .Alarms "alarm" "alarms"}}, rule {{.Rule}})</li>{{end}}</ul>
{{end}}
{{with .ECH}}
<h2>ECH configs in DNS answers</h2>
<p id="ech">{{if .Stripped}}{{plural .Stripped "answer" "answers"}} of egressd's DNS forwarder had theirs stripped (in every mode){{range $i, $n := .Names}}{{if $i}},{{else}}:{{end}} {{$n.Dest}} ({{$n.Count}}){{end}}.{{end}}
{{if .WouldStrip}}{{plural .WouldStrip "DNS exchange" "DNS exchanges"}} with other resolvers kept theirs: in enforce mode every LAN query goes to the forwarder, which strips them.{{end}}
Clients: {{count .ClientCount .ClientsTruncated}}.</p>
{{end}}
<h2>{{if .Audit}}Would be dropped (audit mode: not blocked){{else}}Dropped{{end}} ({{len .Dropped}})</h2>
{{if .Dropped}}
<table id="dropped">
<thead><tr><th>Destination</th><th>IP</th><th>Port</th><th>Flows</th><th>Queries</th>{{if $.Requests}}<th>Requests</th>{{end}}<th>Clients</th>{{if $.MACs}}<th>Devices</th>{{end}}<th>Enforced</th><th>Reason</th><th>First seen</th><th>Last seen</th></tr></thead>
<tbody>
{{range .Dropped}}<tr><td>{{.Dest}}</td><td>{{ips .}}</td><td>{{port .}}</td><td class="n flows">{{.Flows}}</td><td class="n">{{.Queries}}</td>{{if $.Requests}}<td class="n requests">{{.Requests}}</td>{{end}}<td class="clients">{{template "clients" .}}</td>{{if $.MACs}}<td class="n devices">{{count .DeviceCount .DevicesTruncated}}</td>{{end}}<td{{if or .Enforced .EnforcedFlows}} class="enforced"{{end}}>{{enforced .}}</td><td>{{reason .}}</td><td>{{time .FirstSeen}}</td><td>{{time .LastSeen}}</td></tr>
{{end}}</tbody>
</table>
{{else}}<p>Nothing {{if .Audit}}would be{{else}}was{{end}} dropped.</p>{{end}}
</body>
</html>
{{define "clients"}}<details><summary>{{count .ClientCount .ClientsTruncated}}</summary>{{range clients .ClientDevices .Clients}}<div>{{.}}</div>{{end}}{{if .ClientsTruncated}}<div>(more not kept)</div>{{end}}</details>{{end}}`))
