# vmrepl: shared prologue of every script the package ships (Windows PowerShell 5.1, Windows Server 2016+).
#
# Sent on stdin to `powershell.exe -NoProfile -NonInteractive -Command -`, followed by one script that ends
# with a single `Invoke-Vmrepl` call. powershell.exe runs stdin statement by statement, so everything
# that can fail runs inside that one call (one try/catch). `-Command -` reads a multi-line statement until
# a blank line, as the console does: every top-level multi-line statement is followed by a blank line and
# none has a blank line inside it (tests/unit/test_hyperv_scripts.py checks both).
#
# Parameters come only from $env:VMREPL_PARAMS (base64 of UTF-8 JSON), never from this text. The one
# thing printed on stdout is the envelope: {"ok":true,"host":..,"operation":..,"result":..} or
# {"ok":false,"host":..,"operation":..,"message":..,"code":..}; exit 0 after a result, 1 after an error.

Set-StrictMode -Version 3
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
[Console]::OutputEncoding = [Text.UTF8Encoding]::new($false)
# 5.1 adds an ETS Count to arrays, which ConvertTo-Json prints as {"value":[..],"Count":n}.
Remove-TypeData -TypeName System.Array -ErrorAction SilentlyContinue
$VmreplNamespace = 'root/virtualization/v2'
$VmreplOperation = 'powershell.exe'
$VmreplUndo = $null
# What register_vm made so far, removed again if it fails (Undo-VmreplRegister).
$VmreplMadeVm = $null
$VmreplMadeSwitch = $null
$VmreplMadeFiles = New-Object 'System.Collections.Generic.List[string]'

function Write-VmreplEnvelope {
    param(
        [System.Collections.Specialized.OrderedDictionary]$Envelope,
        [int]$ExitCode
    )
    $json = ConvertTo-Json -InputObject ([pscustomobject]$Envelope) -Depth 8 -Compress
    [Console]::Out.Write($json)
    [Console]::Out.Write("`n")
    [Console]::Out.Flush()
    exit $ExitCode
}

function Exit-VmreplResult {
    param(
        [string]$Operation,
        $Result
    )
    $envelope = [ordered]@{ ok = $true; host = [Environment]::MachineName; operation = $Operation; result = $Result }
    Write-VmreplEnvelope -Envelope $envelope -ExitCode 0
}

function Exit-VmreplError {
    param(
        [string]$Operation,
        [string]$Message,
        $Code
    )
    if ($null -ne $Code) {
        $Code = [int64]$Code
    }
    # Undo what the script made before it failed (a checkpoint not yet named as vmrepl's), once.
    $undo = $script:VmreplUndo
    $script:VmreplUndo = $null
    if ($null -ne $undo) {
        try {
            & $undo
            $Message = "$Message (what the script had created was removed)"
        }
        catch {
            $Message = "$Message (and undoing what the script had created failed: $($_.Exception.Message))"
        }
    }
    $envelope = [ordered]@{ ok = $false; host = [Environment]::MachineName; operation = $Operation; message = $Message; code = $Code }
    Write-VmreplEnvelope -Envelope $envelope -ExitCode 1
}

function Get-VmreplFailedOperation {
    param(
        [System.Management.Automation.ErrorRecord]$Record
    )
    # The cmdlet that raised the error when there is one (Get-VM, Invoke-CimMethod, ...), else the
    # operation the script announced last (a WMI method, a class lookup).
    $info = $Record.InvocationInfo
    if ($null -ne $info -and $null -ne $info.MyCommand -and $info.MyCommand.CommandType -eq 'Cmdlet') {
        if ($info.MyCommand.Name -eq 'Invoke-CimMethod') {
            return $script:VmreplOperation
        }
        return $info.MyCommand.Name
    }
    return $script:VmreplOperation
}

function Invoke-Vmrepl {
    param(
        [string]$Operation,
        [scriptblock]$Body
    )
    # Runs the script's body with its parameters; any terminating error becomes an error envelope.
    try {
        $script:VmreplOperation = 'VMREPL_PARAMS'
        $json = [Text.Encoding]::UTF8.GetString([Convert]::FromBase64String($env:VMREPL_PARAMS))
        $params = ConvertFrom-Json -InputObject $json
        $script:VmreplOperation = $Operation
        $result = & $Body $params
        Exit-VmreplResult -Operation $Operation -Result $result
    }
    catch {
        Exit-VmreplError -Operation (Get-VmreplFailedOperation $_) -Message $_.Exception.Message -Code $null
    }
}

function ConvertTo-VmreplEmbeddedInstance {
    param(
        [Microsoft.Management.Infrastructure.CimInstance]$Instance
    )
    # An embedded instance argument (SnapshotSettings, SystemSettings) as the CIM-XML text WMI expects.
    $serializer = [Microsoft.Management.Infrastructure.Serialization.CimSerializer]::Create()
    $options = [Microsoft.Management.Infrastructure.Serialization.InstanceSerializationOptions]::None
    return [Text.Encoding]::Unicode.GetString($serializer.Serialize($Instance, $options))
}

function Wait-VmreplJob {
    param(
        [Microsoft.Management.Infrastructure.CimInstance]$Job,
        [int]$TimeoutSeconds,
        [string]$Operation
    )
    # Msvm_ConcreteJob: 2..6 not finished (New, Starting, Running, Suspended, Shutting Down); 7 Completed
    # and 32768 Completed with warnings succeed; anything else failed, with ErrorCode and ErrorDescription.
    $deadline = [DateTime]::UtcNow.AddSeconds($TimeoutSeconds)
    $current = Get-CimInstance -InputObject $Job
    while ($current.JobState -in 2, 3, 4, 5, 6) {
        if ([DateTime]::UtcNow -ge $deadline) {
            $message = "$Operation started job $($current.InstanceID), which did not finish within $TimeoutSeconds seconds (state $($current.JobState), $($current.PercentComplete)%)"
            Exit-VmreplError -Operation 'Msvm_ConcreteJob' -Message $message -Code $null
        }
        Start-Sleep -Milliseconds 500
        $current = Get-CimInstance -InputObject $current
    }
    if ($current.JobState -notin 7, 32768) {
        $message = "$Operation failed: job $($current.InstanceID) ended in state $($current.JobState): $($current.ErrorDescription)"
        Exit-VmreplError -Operation 'Msvm_ConcreteJob' -Message $message -Code $current.ErrorCode
    }
    return $current
}

function Invoke-VmreplMethod {
    param(
        [Microsoft.Management.Infrastructure.CimInstance]$Target,
        [string]$MethodName,
        [hashtable]$Arguments,
        [int]$TimeoutSeconds
    )
    # A WMI method: 0 done (out parameters in .Output), 4096 a job polled to its end (.Job), else an error
    # envelope carrying the return value.
    $operation = $Target.CimClass.CimClassName + '.' + $MethodName
    $script:VmreplOperation = $operation
    $output = Invoke-CimMethod -InputObject $Target -MethodName $MethodName -Arguments $Arguments
    $returnValue = [int64]$output.ReturnValue
    $job = $null
    if ($returnValue -eq 4096) {
        $job = Wait-VmreplJob -Job $output.Job -TimeoutSeconds $TimeoutSeconds -Operation $operation
    }
    elseif ($returnValue -ne 0) {
        Exit-VmreplError -Operation $operation -Message "$operation returned $returnValue" -Code $returnValue
    }
    return @{ Output = $output; Job = $job }
}

function Get-VmreplService {
    param(
        [string]$ClassName
    )
    $script:VmreplOperation = $ClassName
    return Get-CimInstance -Namespace $VmreplNamespace -ClassName $ClassName
}

function Find-VmreplComputerSystem {
    param(
        [string]$VmId
    )
    # The VM's Msvm_ComputerSystem by its Name (the VM's GUID), or $null. Compared as data, never put in a query.
    $script:VmreplOperation = 'Msvm_ComputerSystem'
    $all = @(Get-CimInstance -Namespace $VmreplNamespace -ClassName Msvm_ComputerSystem)
    foreach ($system in $all) {
        if ($system.Name -eq $VmId) {
            return $system
        }
    }
    return $null
}

function Get-VmreplComputerSystem {
    param(
        [string]$VmId
    )
    $system = Find-VmreplComputerSystem -VmId $VmId
    if ($null -eq $system) {
        Exit-VmreplError -Operation 'Msvm_ComputerSystem' -Message "no virtual machine with id $VmId on this host" -Code $null
    }
    return $system
}

function Get-VmreplSnapshots {
    param(
        [Microsoft.Management.Infrastructure.CimInstance]$System
    )
    $script:VmreplOperation = 'Msvm_SnapshotOfVirtualSystem'
    Get-CimAssociatedInstance -InputObject $System -Association Msvm_SnapshotOfVirtualSystem -ResultClassName Msvm_VirtualSystemSettingData
}

function Get-VmreplReferencePoints {
    param(
        [Microsoft.Management.Infrastructure.CimInstance]$System
    )
    $script:VmreplOperation = 'Msvm_ReferencePointOfVirtualSystem'
    Get-CimAssociatedInstance -InputObject $System -Association Msvm_ReferencePointOfVirtualSystem -ResultClassName Msvm_VirtualSystemReferencePoint
}

function ConvertTo-VmreplGuid {
    param(
        [string]$Value
    )
    # VM ids as one spelling (lower case, dashes) whichever class or cmdlet reported them.
    $guid = [guid]::Empty
    if ([guid]::TryParse($Value, [ref]$guid)) {
        return $guid.ToString()
    }
    return $Value
}

function ConvertTo-VmreplDate {
    param(
        $Value
    )
    # ISO 8601 in UTC with its "Z": a date without an offset names no instant.
    return ([datetime]$Value).ToUniversalTime().ToString('o')
}

function Get-VmreplSnapshotDisks {
    param(
        [Microsoft.Management.Infrastructure.CimInstance]$Snapshot
    )
    # The virtual disks a snapshot froze: its Msvm_StorageAllocationSettingData of ResourceType 31
    # (Logical Disk); HostResource[0] is the file the snapshot references (the frozen one).
    $script:VmreplOperation = 'Msvm_StorageAllocationSettingData'
    $settings = @(Get-CimAssociatedInstance -InputObject $Snapshot -Association Msvm_VirtualSystemSettingDataComponent -ResultClassName Msvm_StorageAllocationSettingData)
    foreach ($sasd in $settings) {
        if ($sasd.ResourceType -ne 31 -or $null -eq $sasd.HostResource -or $sasd.HostResource.Length -eq 0) {
            continue
        }
        $path = [string]$sasd.HostResource[0]
        $vhd = Get-VHD -Path $path
        [pscustomobject]@{
            instance_id = [string]$sasd.InstanceID
            path = $path
            size = [int64]$vhd.Size
        }
    }
}

function ConvertTo-VmreplSnapshot {
    param(
        [Microsoft.Management.Infrastructure.CimInstance]$Snapshot
    )
    $disks = [object[]]@(Get-VmreplSnapshotDisks -Snapshot $Snapshot)
    [pscustomobject]@{
        id = [string]$Snapshot.InstanceID
        vm_id = ConvertTo-VmreplGuid -Value ([string]$Snapshot.VirtualSystemIdentifier)
        name = [string]$Snapshot.ElementName
        type = [string]$Snapshot.VirtualSystemType
        created = ConvertTo-VmreplDate -Value $Snapshot.CreationTime
        disks = $disks
    }
}

function ConvertTo-VmreplReferencePoint {
    param(
        [Microsoft.Management.Infrastructure.CimInstance]$ReferencePoint
    )
    # VirtualDiskIdentifiers[i] is the disk whose RCT id is ResilientChangeTrackingIdentifiers[i]: kept in order.
    [pscustomobject]@{
        id = [string]$ReferencePoint.InstanceID
        vm_id = ConvertTo-VmreplGuid -Value ([string]$ReferencePoint.VirtualSystemIdentifier)
        type = [int]$ReferencePoint.ReferencePointType
        consistency_level = [int]$ReferencePoint.ConsistencyLevel
        disk_ids = [string[]]@($ReferencePoint.VirtualDiskIdentifiers | Where-Object { $null -ne $_ })
        rct_ids = [string[]]@($ReferencePoint.ResilientChangeTrackingIdentifiers | Where-Object { $null -ne $_ })
    }
}

function Get-VmreplDiskSettings {
    param(
        [Microsoft.Management.Infrastructure.CimInstance]$System
    )
    # The VM's current virtual disks, by file path: path -> Msvm_StorageAllocationSettingData InstanceID
    # (what reference points name in VirtualDiskIdentifiers).
    $script:VmreplOperation = 'Msvm_SettingsDefineState'
    $byPath = @{}
    $current = Get-CimAssociatedInstance -InputObject $System -Association Msvm_SettingsDefineState -ResultClassName Msvm_VirtualSystemSettingData
    foreach ($settings in @($current)) {
        $disks = @(Get-CimAssociatedInstance -InputObject $settings -Association Msvm_VirtualSystemSettingDataComponent -ResultClassName Msvm_StorageAllocationSettingData)
        foreach ($sasd in $disks) {
            if ($sasd.ResourceType -eq 31 -and $null -ne $sasd.HostResource -and $sasd.HostResource.Length -gt 0) {
                $byPath[[string]$sasd.HostResource[0]] = [string]$sasd.InstanceID
            }
        }
    }
    return $byPath
}

function Get-VmreplParentChain {
    param(
        [string]$ParentPath
    )
    # ParentPath upwards to the base disk; a loop or an absurd depth is an error, not a hang.
    $chain = New-Object 'System.Collections.Generic.List[string]'
    $next = $ParentPath
    while ($next) {
        if ($chain.Contains($next) -or $chain.Count -ge 256) {
            throw "the differencing chain of $ParentPath loops or is deeper than 256 disks"
        }
        $chain.Add($next)
        $next = [string](Get-VHD -Path $next).ParentPath
    }
    return , ($chain.ToArray())
}

function ConvertTo-VmreplDisk {
    param(
        $Drive,
        [hashtable]$SettingsByPath
    )
    $path = [string]$Drive.Path
    if (-not $SettingsByPath.ContainsKey($path)) {
        throw "the disk $path of $($Drive.VMName) has no storage allocation settings in the VM's configuration"
    }
    $vhd = Get-VHD -Path $path
    $chain = [string[]](Get-VmreplParentChain -ParentPath ([string]$vhd.ParentPath))
    [pscustomobject]@{
        instance_id = $SettingsByPath[$path]
        controller_type = $Drive.ControllerType.ToString()
        controller_number = [int]$Drive.ControllerNumber
        controller_location = [int]$Drive.ControllerLocation
        path = $path
        format = $vhd.VhdFormat.ToString()
        type = $vhd.VhdType.ToString()
        size = [int64]$vhd.Size
        block_size = [int64]$vhd.BlockSize
        logical_sector_size = [int64]$vhd.LogicalSectorSize
        parent_chain = $chain
    }
}

function ConvertTo-VmreplNic {
    param(
        $Adapter
    )
    $switchName = $null
    if ($Adapter.SwitchName) {
        $switchName = [string]$Adapter.SwitchName
    }
    $vlanId = $null
    $vlan = Get-VMNetworkAdapterVlan -VMNetworkAdapter $Adapter
    if ($null -ne $vlan -and $vlan.OperationMode.ToString() -eq 'Access') {
        $vlanId = [int]$vlan.AccessVlanId
    }
    [pscustomobject]@{
        name = [string]$Adapter.Name
        switch = $switchName
        mac = [string]$Adapter.MacAddress
        dynamic_mac = [bool]$Adapter.DynamicMacAddressEnabled
        vlan_id = $vlanId
    }
}

function Get-VmreplUnsupportedDisks {
    param(
        $Vm,
        $Drives
    )
    # Disks a checkpoint cannot include (IgnoreNonSnapshottableDisks skips them): reported, never read.
    foreach ($drive in $Drives) {
        if ($null -ne $drive.DiskNumber) {
            "$($drive.ControllerType) $($drive.ControllerNumber):$($drive.ControllerLocation) pass-through disk $($drive.DiskNumber)"
        }
    }
    foreach ($hba in @(Get-VMFibreChannelHba -VM $Vm)) {
        "virtual Fibre Channel adapter on SAN $($hba.SanName)"
    }
}

function ConvertTo-VmreplVm {
    param(
        $Vm,
        [Microsoft.Management.Infrastructure.CimInstance]$System
    )
    $drives = @(Get-VMHardDiskDrive -VM $Vm)
    $byPath = Get-VmreplDiskSettings -System $System
    $script:VmreplOperation = 'Get-VM'
    $disks = [object[]]@(foreach ($drive in $drives) { if ($null -eq $drive.DiskNumber) { ConvertTo-VmreplDisk -Drive $drive -SettingsByPath $byPath } })
    $nics = [object[]]@(foreach ($adapter in @(Get-VMNetworkAdapter -VM $Vm)) { ConvertTo-VmreplNic -Adapter $adapter })
    $unsupported = [string[]]@(Get-VmreplUnsupportedDisks -Vm $Vm -Drives $drives)
    $secureBoot = $null
    $template = $null
    $tpm = $null
    if ($Vm.Generation -eq 2) {
        $firmware = Get-VMFirmware -VM $Vm
        $secureBoot = $firmware.SecureBoot.ToString() -eq 'On'
        $template = [string]$firmware.SecureBootTemplate
        $tpm = [bool](Get-VMSecurity -VM $Vm).TpmEnabled
    }
    [pscustomobject]@{
        id = $Vm.Id.ToString()
        name = [string]$Vm.Name
        state = $Vm.State.ToString()
        enabled_state = [int]$System.EnabledState
        generation = [int]$Vm.Generation
        version = [string]$Vm.Version
        secure_boot = $secureBoot
        secure_boot_template = $template
        tpm = $tpm
        processors = [int]$Vm.ProcessorCount
        memory_startup = [int64]$Vm.MemoryStartup
        dynamic_memory = [bool]$Vm.DynamicMemoryEnabled
        memory_minimum = [int64]$Vm.MemoryMinimum
        memory_maximum = [int64]$Vm.MemoryMaximum
        checkpoint_type = $Vm.CheckpointType.ToString()
        notes = [string]$Vm.Notes
        nics = $nics
        disks = $disks
        unsupported_disks = $unsupported
    }
}

function ConvertTo-VmreplVms {
    param(
        [object[]]$Vms
    )
    # One Msvm_ComputerSystem lookup for all VMs: its Name is the VM's id.
    $script:VmreplOperation = 'Msvm_ComputerSystem'
    $systems = @{}
    foreach ($system in @(Get-CimInstance -Namespace $VmreplNamespace -ClassName Msvm_ComputerSystem)) {
        $systems[(ConvertTo-VmreplGuid -Value ([string]$system.Name))] = $system
    }
    foreach ($vm in $Vms) {
        $id = $vm.Id.ToString()
        if (-not $systems.ContainsKey($id)) {
            throw "the VM $id ($($vm.Name)) has no Msvm_ComputerSystem"
        }
        ConvertTo-VmreplVm -Vm $vm -System $systems[$id]
    }
}

function Find-VmreplSnapshot {
    param(
        [Microsoft.Management.Infrastructure.CimInstance]$System,
        [string]$SnapshotId
    )
    # One snapshot of the VM by its InstanceID, or $null (already gone).
    foreach ($snapshot in @(Get-VmreplSnapshots -System $System)) {
        if ([string]$snapshot.InstanceID -eq $SnapshotId) {
            return $snapshot
        }
    }
    return $null
}

function Find-VmreplReferencePoint {
    param(
        [Microsoft.Management.Infrastructure.CimInstance]$System,
        [string]$ReferencePointId
    )
    # One reference point of the VM by its InstanceID, or $null (already gone).
    foreach ($point in @(Get-VmreplReferencePoints -System $System)) {
        if ([string]$point.InstanceID -eq $ReferencePointId) {
            return $point
        }
    }
    return $null
}

function ConvertTo-VmreplPower {
    param(
        [Microsoft.Management.Infrastructure.CimInstance]$System
    )
    [pscustomobject]@{
        vm_id = ConvertTo-VmreplGuid -Value ([string]$System.Name)
        enabled_state = [int]$System.EnabledState
    }
}

function Get-VmreplShutdownComponent {
    param(
        [Microsoft.Management.Infrastructure.CimInstance]$System
    )
    # The guest's shutdown integration service (Msvm_ShutdownComponent, a device of the VM through
    # Msvm_SystemDevice); without it a clean shutdown cannot be asked for.
    $script:VmreplOperation = 'Msvm_ShutdownComponent'
    $found = @(Get-CimAssociatedInstance -InputObject $System -Association Msvm_SystemDevice -ResultClassName Msvm_ShutdownComponent)
    if ($found.Length -eq 0) {
        Exit-VmreplError -Operation 'Msvm_ShutdownComponent' -Message "the VM $($System.ElementName) has no shutdown integration service: its guest cannot be shut down cleanly" -Code $null
    }
    return $found[0]
}

function Undo-VmreplRegister {
    # What register_vm made before it failed: the VM (off: it was never started), the differencing disks,
    # the private switch. The parents of the differencing disks are never touched.
    if ($null -ne $script:VmreplMadeVm) {
        Remove-VM -VM $script:VmreplMadeVm -Force
    }
    foreach ($file in $script:VmreplMadeFiles) {
        if (Test-Path -LiteralPath $file) {
            Remove-Item -LiteralPath $file -Force
        }
    }
    if ($null -ne $script:VmreplMadeSwitch) {
        Remove-VmreplPrivateSwitch -Name $script:VmreplMadeSwitch
    }
}

function Remove-VmreplPrivateSwitch {
    param(
        [string]$Name
    )
    # Only a private switch of exactly that name (Get-VMSwitch -Name takes wildcards), once no adapter uses it.
    $script:VmreplOperation = 'Remove-VMSwitch'
    foreach ($switch in @(Get-VMSwitch | Where-Object { $_.Name -eq $Name })) {
        if ($switch.SwitchType.ToString() -ne 'Private') {
            continue
        }
        $users = @(Get-VMNetworkAdapter -All | Where-Object { $_.SwitchName -eq $Name })
        if ($users.Length -eq 0) {
            Remove-VMSwitch -VMSwitch $switch -Force
        }
    }
}

function New-VmreplPrivateSwitch {
    param(
        [string]$Name
    )
    # The isolated network of a test failover: a private switch (no host or physical network), made once.
    $script:VmreplOperation = 'New-VMSwitch'
    $existing = @(Get-VMSwitch | Where-Object { $_.Name -eq $Name })
    if ($existing.Length -gt 0) {
        if ($existing[0].SwitchType.ToString() -ne 'Private') {
            throw "the switch $Name exists and is not private: an isolated VM cannot use it"
        }
        return
    }
    $null = New-VMSwitch -Name $Name -SwitchType Private
    $script:VmreplMadeSwitch = $Name
}

function Set-VmreplFirmware {
    param(
        $Vm,
        [bool]$SecureBoot,
        [string]$Template,
        [bool]$Tpm
    )
    # Generation 2 only. A vTPM gets a new local key protector: the source's guest state cannot follow it.
    $script:VmreplOperation = 'Set-VMFirmware'
    if (-not $SecureBoot) {
        Set-VMFirmware -VM $Vm -EnableSecureBoot Off
    }
    elseif ($Template) {
        Set-VMFirmware -VM $Vm -EnableSecureBoot On -SecureBootTemplate $Template
    }
    else {
        Set-VMFirmware -VM $Vm -EnableSecureBoot On
    }
    if ($Tpm) {
        $script:VmreplOperation = 'Enable-VMTPM'
        Set-VMKeyProtector -VM $Vm -NewLocalKeyProtector
        Enable-VMTPM -VM $Vm
    }
}

function Add-VmreplDisk {
    param(
        $Vm,
        $Disk,
        [int]$TimeoutSeconds
    )
    # The host makes the differencing VHDX over the parent (Msvm_VirtualHardDiskSettingData Type 4
    # Differencing, Format 3 VHDX), then it is attached at the slot the captured disk id names.
    $path = [string]$Disk.path
    if (Test-Path -LiteralPath $path) {
        throw "$path exists already: vmrepl makes a VM's differencing disks itself and never reuses a file it finds"
    }
    $service = Get-VmreplService -ClassName Msvm_ImageManagementService
    $script:VmreplOperation = 'Msvm_VirtualHardDiskSettingData'
    $class = Get-CimClass -Namespace $VmreplNamespace -ClassName Msvm_VirtualHardDiskSettingData
    $properties = @{ Type = [uint16]4; Format = [uint16]3; Path = $path; ParentPath = [string]$Disk.parent }
    $settings = New-CimInstance -CimClass $class -ClientOnly -Property $properties
    $create = @{ VirtualDiskSettingData = (ConvertTo-VmreplEmbeddedInstance -Instance $settings) }
    $script:VmreplMadeFiles.Add($path)
    $null = Invoke-VmreplMethod -Target $service -MethodName CreateVirtualHardDisk -Arguments $create -TimeoutSeconds $TimeoutSeconds
    $script:VmreplOperation = 'Add-VMHardDiskDrive'
    $type = [string]$Disk.controller_type
    $number = [int]$Disk.controller_number
    if ($type -eq 'SCSI') {
        for ($i = @(Get-VMScsiController -VM $Vm).Length; $i -le $number; $i++) {
            Add-VMScsiController -VM $Vm
        }
    }
    Add-VMHardDiskDrive -VM $Vm -ControllerType $type -ControllerNumber $number -ControllerLocation ([int]$Disk.controller_location) -Path $path
}

function Add-VmreplNic {
    param(
        $Vm,
        $Nic
    )
    # Connected to the switch the network mapping gave, or to none; the captured static MAC and access VLAN kept.
    $script:VmreplOperation = 'Add-VMNetworkAdapter'
    if ($null -ne $Nic.switch) {
        $adapter = Add-VMNetworkAdapter -VM $Vm -Name ([string]$Nic.name) -SwitchName ([string]$Nic.switch) -Passthru
    }
    else {
        $adapter = Add-VMNetworkAdapter -VM $Vm -Name ([string]$Nic.name) -Passthru
    }
    if ($null -ne $Nic.mac) {
        Set-VMNetworkAdapter -VMNetworkAdapter $adapter -StaticMacAddress ([string]$Nic.mac)
    }
    if ($null -ne $Nic.vlan_id) {
        Set-VMNetworkAdapterVlan -VMNetworkAdapter $adapter -Access -VlanId ([int]$Nic.vlan_id)
    }
}
