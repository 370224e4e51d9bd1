# create_checkpoint: a recovery checkpoint (SnapshotType 32768) of the VM, named $Params.name, reported with
# the disks it froze. Hyper-V names a new checkpoint itself, so it is renamed with ModifySystemSettings;
# if that fails the checkpoint is destroyed again, since vmrepl finds its own checkpoints by that name.

Invoke-Vmrepl 'Msvm_VirtualSystemSnapshotService.CreateSnapshot' {
    param($Params)
    $timeout = [int]$Params.timeout_seconds
    $system = Get-VmreplComputerSystem -VmId ([string]$Params.vm_id)
    $service = Get-VmreplService -ClassName Msvm_VirtualSystemSnapshotService
    $script:VmreplOperation = 'Msvm_VirtualSystemSnapshotSettingData'
    $class = Get-CimClass -Namespace $VmreplNamespace -ClassName Msvm_VirtualSystemSnapshotSettingData
    $properties = @{ ConsistencyLevel = [byte]$Params.consistency_level; IgnoreNonSnapshottableDisks = $true }
    # GuestBackupType exists from Windows Server 2019 (10.0.17763); on 2016 the guest's VSS default applies.
    if (@($class.CimClassProperties | Where-Object { $_.Name -eq 'GuestBackupType' }).Length -gt 0) {
        $properties['GuestBackupType'] = [byte]$Params.guest_backup_type
    }
    $settings = New-CimInstance -CimClass $class -ClientOnly -Property $properties
    $arguments = @{
        AffectedSystem = $system
        SnapshotSettings = (ConvertTo-VmreplEmbeddedInstance -Instance $settings)
        SnapshotType = [uint16]32768
    }
    $call = Invoke-VmreplMethod -Target $service -MethodName CreateSnapshot -Arguments $arguments -TimeoutSeconds $timeout
    if ($null -eq $call.Job) {
        $snapshot = Get-CimInstance -InputObject $call.Output.ResultingSnapshot
    }
    else {
        $script:VmreplOperation = 'Msvm_AffectedJobElement'
        $related = @(Get-CimAssociatedInstance -InputObject $call.Job -ResultClassName Msvm_VirtualSystemSettingData)
        $snapshot = $related | Where-Object { [string]$_.VirtualSystemType -like 'Microsoft:Hyper-V:Snapshot:*' } | Select-Object -First 1
    }
    if ($null -eq $snapshot) {
        Exit-VmreplError -Operation 'Msvm_VirtualSystemSnapshotService.CreateSnapshot' -Message 'the snapshot service reported success but no snapshot' -Code $null
    }
    $script:VmreplUndo = {
        $null = Invoke-CimMethod -InputObject $service -MethodName DestroySnapshot -Arguments @{ AffectedSnapshot = $snapshot }
    }.GetNewClosure()
    $snapshot.ElementName = [string]$Params.name
    $management = Get-VmreplService -ClassName Msvm_VirtualSystemManagementService
    $rename = @{ SystemSettings = (ConvertTo-VmreplEmbeddedInstance -Instance $snapshot) }
    $null = Invoke-VmreplMethod -Target $management -MethodName ModifySystemSettings -Arguments $rename -TimeoutSeconds $timeout
    $snapshot = Get-CimInstance -InputObject $snapshot
    $result = ConvertTo-VmreplSnapshot -Snapshot $snapshot
    $script:VmreplUndo = $null
    return $result
}

