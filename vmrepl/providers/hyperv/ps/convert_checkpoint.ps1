# convert_checkpoint: turn a recovery snapshot into an RCT reference point. The conversion removes the
# snapshot itself (its differencing disks are merged), so it is never destroyed here afterwards.

Invoke-Vmrepl 'Msvm_VirtualSystemSnapshotService.ConvertToReferencePoint' {
    param($Params)
    $system = Get-VmreplComputerSystem -VmId ([string]$Params.vm_id)
    $snapshot = Find-VmreplSnapshot -System $system -SnapshotId ([string]$Params.snapshot_id)
    if ($null -eq $snapshot) {
        Exit-VmreplError -Operation 'Msvm_VirtualSystemSettingData' -Message "no snapshot $($Params.snapshot_id) of the VM $($Params.vm_id)" -Code $null
    }
    $service = Get-VmreplService -ClassName Msvm_VirtualSystemSnapshotService
    $arguments = @{ AffectedSnapshot = $snapshot }
    $call = Invoke-VmreplMethod -Target $service -MethodName ConvertToReferencePoint -Arguments $arguments -TimeoutSeconds ([int]$Params.timeout_seconds)
    if ($null -eq $call.Job) {
        $point = Get-CimInstance -InputObject $call.Output.ResultingReferencePoint
    }
    else {
        $script:VmreplOperation = 'Msvm_AffectedJobElement'
        $point = @(Get-CimAssociatedInstance -InputObject $call.Job -ResultClassName Msvm_VirtualSystemReferencePoint) | Select-Object -First 1
    }
    if ($null -eq $point) {
        Exit-VmreplError -Operation 'Msvm_VirtualSystemSnapshotService.ConvertToReferencePoint' -Message 'the conversion reported success but no reference point' -Code $null
    }
    return ConvertTo-VmreplReferencePoint -ReferencePoint $point
}

