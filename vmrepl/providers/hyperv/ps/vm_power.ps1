# vm_power: the VM's Msvm_ComputerSystem.EnabledState (2 running, 3 off, others in between).

Invoke-Vmrepl 'Msvm_ComputerSystem' {
    param($Params)
    $system = Get-VmreplComputerSystem -VmId ([string]$Params.vm)
    return ConvertTo-VmreplPower -System $system
}
