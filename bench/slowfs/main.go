// slowfs mounts a directory again through FUSE, adding a fixed delay to
// every create (files, directories, links, device nodes): a file system
// where creating a file costs a network round trip, as on an NFS, EFS or
// CephFS volume behind a PVC, for benchmarks and tests on 127.0.0.1.
// Reads and writes pass through undelayed.
//
// Usage: slowfs -delay 2ms BACKING MOUNTPOINT   (unmount with SIGINT/SIGTERM)
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

var (
	delay   time.Duration
	creates atomic.Int64
)

type slowNode struct {
	fs.LoopbackNode
}

func slow() {
	creates.Add(1)
	time.Sleep(delay)
}

func (n *slowNode) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	slow()
	return n.LoopbackNode.Create(ctx, name, flags, mode, out)
}

func (n *slowNode) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	slow()
	return n.LoopbackNode.Mkdir(ctx, name, mode, out)
}

func (n *slowNode) Mknod(ctx context.Context, name string, mode, rdev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	slow()
	return n.LoopbackNode.Mknod(ctx, name, mode, rdev, out)
}

func (n *slowNode) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	slow()
	return n.LoopbackNode.Symlink(ctx, target, name, out)
}

func (n *slowNode) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	slow()
	return n.LoopbackNode.Link(ctx, target, name, out)
}

func main() {
	flag.DurationVar(&delay, "delay", 2*time.Millisecond, "added to every create")
	flag.Parse()
	if flag.NArg() != 2 {
		fmt.Fprintln(os.Stderr, "usage: slowfs [-delay 2ms] BACKING MOUNTPOINT")
		os.Exit(2)
	}
	backing, mountpoint := flag.Arg(0), flag.Arg(1)
	var st syscall.Stat_t
	if err := syscall.Stat(backing, &st); err != nil {
		fmt.Fprintf(os.Stderr, "slowfs: failed to inspect %s: %v\n", backing, err)
		os.Exit(1)
	}
	root := &fs.LoopbackRoot{
		Path: backing,
		Dev:  uint64(st.Dev),
		NewNode: func(r *fs.LoopbackRoot, _ *fs.Inode, _ string, _ *syscall.Stat_t) fs.InodeEmbedder {
			return &slowNode{fs.LoopbackNode{RootData: r}}
		},
	}
	root.RootNode = &slowNode{fs.LoopbackNode{RootData: root}}
	server, err := fs.Mount(mountpoint, root.RootNode, &fs.Options{
		MountOptions: fuse.MountOptions{
			FsName:      "slowfs",
			Name:        "slowfs",
			DirectMount: true,
			AllowOther:  true,
			MaxWrite:    1 << 20,
		},
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "slowfs: failed to mount %s: %v\n", mountpoint, err)
		os.Exit(1)
	}
	fmt.Printf("slowfs: %s mounted on %s, %v per create\n", backing, mountpoint, delay)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		if err := server.Unmount(); err != nil {
			fmt.Fprintf(os.Stderr, "slowfs: failed to unmount: %v\n", err)
		}
	}()
	server.Wait()
	fmt.Printf("slowfs: unmounted after %d creates\n", creates.Load())
}
