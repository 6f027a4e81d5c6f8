//go:build tools

// Package tools records etcd (the module go.etcd.io/etcd/server/v3 is itself the main package)
// so that `go mod tidy` keeps its modules in go.sum. It is never built itself.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
)
