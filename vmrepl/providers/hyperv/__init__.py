"""The Hyper-V provider (issue 12), reached over WinRM (docs/hyperv.md).

`winrm` runs the PowerShell scripts shipped in `ps/` (named in `scripts`, their parameters and results in
`models`) on a host; `envelope` reads the one JSON envelope a script prints on stdout into a typed result or
a `vmrepl.errors.HostError`, and `clixml` turns the CLIXML a script leaves on stderr into message lines;
`provider` implements vmrepl's provider interface on top of them.
"""
