"""The PowerShell scripts the Hyper-V provider sends to hosts (read by vmrepl.providers.hyperv.scripts)."""
