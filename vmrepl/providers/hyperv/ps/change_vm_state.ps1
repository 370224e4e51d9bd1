# change_vm_state: start (RequestedState 2) or turn off (3) the VM, waiting for the state change's job; a VM
# already in that state is left as it is.

Invoke-Vmrepl 'Msvm_ComputerSystem.RequestStateChange' {
    param($Params)
    $system = Get-VmreplComputerSystem -VmId ([string]$Params.vm_id)
    $wanted = [int]$Params.requested_state
    if ([int]$system.EnabledState -ne $wanted) {
        $change = @{ RequestedState = [uint16]$wanted }
        $null = Invoke-VmreplMethod -Target $system -MethodName RequestStateChange -Arguments $change -TimeoutSeconds ([int]$Params.timeout_seconds)
        $system = Get-CimInstance -InputObject $system
    }
    return ConvertTo-VmreplPower -System $system
}
