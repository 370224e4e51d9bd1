# shutdown_vm: ask the guest to shut down through its shutdown integration service and return at once (the
# provider polls vm_power until it is off); a VM already off is left as it is.

Invoke-Vmrepl 'Msvm_ShutdownComponent.InitiateShutdown' {
    param($Params)
    $system = Get-VmreplComputerSystem -VmId ([string]$Params.vm_id)
    if ([int]$system.EnabledState -ne 3) {
        $component = Get-VmreplShutdownComponent -System $system
        $shutdown = @{ Force = $true; Reason = 'vmrepl: shut down for a failover or failback' }
        $null = Invoke-VmreplMethod -Target $component -MethodName InitiateShutdown -Arguments $shutdown -TimeoutSeconds ([int]$Params.timeout_seconds)
        $system = Get-CimInstance -InputObject $system
    }
    return ConvertTo-VmreplPower -System $system
}
