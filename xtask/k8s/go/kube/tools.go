//go:build tools

// Package tools records the Kubernetes commands that `cargo xtask k8s build` compiles,
// so that `go mod tidy` keeps their modules in go.sum. It is never built itself.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
