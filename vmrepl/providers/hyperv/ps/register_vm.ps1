# register_vm: a VM made from a captured configuration (failover): New-VM in $Params.folder without disks,
# processors, memory, firmware and TPM, one differencing VHDX per disk made by the host over its parent and
# attached at its slot (Add-VmreplDisk), NICs on the switches given (or none), a private switch when asked.
# Its Notes say `creating` from New-VM on and `registered` once it is complete; whatever the script made is
# removed again if it fails (Undo-VmreplRegister).

Invoke-Vmrepl 'New-VM' {
    param($Params)
    $timeout = [int]$Params.timeout_seconds
    $script:VmreplUndo = { Undo-VmreplRegister }
    if ($null -ne $Params.private_switch) {
        New-VmreplPrivateSwitch -Name ([string]$Params.private_switch)
    }
    $name = [string]$Params.name
    $folder = [string]$Params.folder
    $memory = [int64]$Params.memory_startup
    $generation = [int16]$Params.generation
    $script:VmreplOperation = 'New-VM'
    if ([string]$Params.version) {
        $vm = New-VM -Name $name -Path $folder -Generation $generation -MemoryStartupBytes $memory -NoVHD -Version ([string]$Params.version)
    }
    else {
        $vm = New-VM -Name $name -Path $folder -Generation $generation -MemoryStartupBytes $memory -NoVHD
    }
    $script:VmreplMadeVm = $vm
    $script:VmreplOperation = 'Set-VM'
    Set-VM -VM $vm -Notes ([string]$Params.creating) -ProcessorCount ([int64]$Params.processors)
    if ($Params.dynamic_memory) {
        Set-VMMemory -VM $vm -DynamicMemoryEnabled $true -StartupBytes $memory -MinimumBytes ([int64]$Params.memory_minimum) -MaximumBytes ([int64]$Params.memory_maximum)
    }
    else {
        Set-VMMemory -VM $vm -DynamicMemoryEnabled $false -StartupBytes $memory
    }
    if ($generation -eq 2) {
        Set-VmreplFirmware -Vm $vm -SecureBoot ([bool]$Params.secure_boot) -Template ([string]$Params.secure_boot_template) -Tpm ([bool]$Params.tpm)
    }
    foreach ($disk in @($Params.disks)) {
        Add-VmreplDisk -Vm $vm -Disk $disk -TimeoutSeconds $timeout
    }
    $script:VmreplOperation = 'Remove-VMNetworkAdapter'
    Get-VMNetworkAdapter -VM $vm | Remove-VMNetworkAdapter
    foreach ($nic in @($Params.nics)) {
        Add-VmreplNic -Vm $vm -Nic $nic
    }
    $script:VmreplOperation = 'Set-VM'
    Set-VM -VM $vm -Notes ([string]$Params.registered)
    $result = ConvertTo-VmreplVms -Vms @(Get-VM -Id $vm.Id)
    $script:VmreplUndo = $null
    return $result
}
