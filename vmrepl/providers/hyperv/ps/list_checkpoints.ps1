# list_checkpoints: every snapshot of the VM (recovery or not, any name); the provider keeps vmrepl's own.

Invoke-Vmrepl 'Msvm_SnapshotOfVirtualSystem' {
    param($Params)
    $system = Get-VmreplComputerSystem -VmId ([string]$Params.vm)
    $snapshots = @(Get-VmreplSnapshots -System $system)
    return , ([object[]]@(foreach ($snapshot in $snapshots) { ConvertTo-VmreplSnapshot -Snapshot $snapshot }))
}

