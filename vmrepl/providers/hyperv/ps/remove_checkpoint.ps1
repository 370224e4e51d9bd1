# remove_checkpoint: destroy one snapshot of the VM; a snapshot (or VM) already gone is {"removed": false}.

Invoke-Vmrepl 'Msvm_VirtualSystemSnapshotService.DestroySnapshot' {
    param($Params)
    $snapshot = $null
    $system = Find-VmreplComputerSystem -VmId ([string]$Params.vm_id)
    if ($null -ne $system) {
        $snapshot = Find-VmreplSnapshot -System $system -SnapshotId ([string]$Params.snapshot_id)
    }
    if ($null -eq $snapshot) {
        return [pscustomobject]@{ removed = $false }
    }
    $service = Get-VmreplService -ClassName Msvm_VirtualSystemSnapshotService
    $arguments = @{ AffectedSnapshot = $snapshot }
    $null = Invoke-VmreplMethod -Target $service -MethodName DestroySnapshot -Arguments $arguments -TimeoutSeconds ([int]$Params.timeout_seconds)
    return [pscustomobject]@{ removed = $true }
}

