package policy

import "sync"

// hostLevel is an engine's HostLevel engine, compiled once.
type hostLevel struct {
	once sync.Once
	e    *Engine
}

// HostLevel returns the engine of e's policy without its host/path
// targets: the rules that allow a flow whatever its path. The proxy and
// capture ask it whether a request that a host/path rule allows by its
// path is allowed at host level too (the path-form check, inspection).
// It is compiled once per engine, on first use.
func (e *Engine) HostLevel() *Engine {
	e.host.once.Do(func() {
		pol := e.pol
		host := &Policy{File: pol.File, Version: pol.Version, Mode: pol.Mode, Groups: pol.Groups}
		for _, r := range pol.Rules {
			hr := r
			hr.To = nil
			for _, t := range r.To {
				if t.Kind != TargetHostPath {
					hr.To = append(hr.To, t)
				}
			}
			host.Rules = append(host.Rules, hr)
		}
		e.host.e = New(host).WithNAT64(e.nat64)
	})
	return e.host.e
}
