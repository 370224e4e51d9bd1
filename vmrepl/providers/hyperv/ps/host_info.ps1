# host_info: what the host is (name, Windows build, Hyper-V version, the VM configuration versions it supports).

Invoke-Vmrepl 'host_info' {
    param($Params)
    $os = [Environment]::OSVersion.Version
    $script:VmreplOperation = 'Get-CimInstance'
    $caption = [string](Get-CimInstance -ClassName Win32_OperatingSystem).Caption
    # vmms.exe is the Virtual Machine Management Service: its version is the Hyper-V version, and a host
    # without it has no Hyper-V role.
    $vmms = Get-Item -LiteralPath (Join-Path $env:SystemRoot 'System32\vmms.exe')
    $versions = @()
    if ($null -ne (Get-Command -Name Get-VMHostSupportedVersion -ErrorAction SilentlyContinue)) {
        $versions = @(Get-VMHostSupportedVersion | ForEach-Object { $_.Version.ToString() })
    }
    [pscustomobject]@{
        name = [Environment]::MachineName
        os_version = $os.ToString()
        os_build = [int]$os.Build
        os_caption = $caption
        hyperv_version = [string]$vmms.VersionInfo.ProductVersion
        supported_versions = [string[]]$versions
    }
}

