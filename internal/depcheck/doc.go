// Package depcheck holds only a test: it keeps the direction of egressd's
// dependencies (policy ← audit ← components ← cmd), so that the components
// never import each other (DESIGN.md, "Data flow").
package depcheck
