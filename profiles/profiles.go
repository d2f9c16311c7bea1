// Package profiles holds the policies embedded in the egressd binary. The
// default, "nirovision", is the vendor page in ../shared/seed turned into
// policy; `egressd run` uses it when given no --policy.
package profiles

import (
	"embed"
	"fmt"
	"sort"
	"strings"
)

//go:embed *.yaml
var files embed.FS

// Default is the profile used when no policy is given.
const Default = "nirovision"

// Names lists the embedded profiles.
func Names() []string {
	ents, _ := files.ReadDir(".")
	var out []string
	for _, e := range ents {
		out = append(out, strings.TrimSuffix(e.Name(), ".yaml"))
	}
	sort.Strings(out)
	return out
}

// Get returns the YAML of a profile.
func Get(name string) ([]byte, error) {
	b, err := files.ReadFile(name + ".yaml")
	if err != nil {
		return nil, fmt.Errorf("profiles: no profile %q (have %s)", name, strings.Join(Names(), ", "))
	}
	return b, nil
}

// File is the name errors and reports use for a profile.
func File(name string) string { return "profile:" + name }
