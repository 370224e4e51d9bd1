"""Hypervisor providers: what the controller asks a host about its VMs, disks and checkpoints."""
