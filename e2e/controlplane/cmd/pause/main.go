// Command pause is the sandbox ("pause") container of scripts/cluster.sh's node:
// it sleeps, reaps children it inherits as PID 1, and exits 0 on SIGTERM or
// SIGINT. No image can be pulled here, so the node's sandbox image is this
// static binary packed as a one-layer OCI image (e2e/cluster/oci.py).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		os.Stdout.WriteString("pause (tandem)\n")
		return
	}
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
