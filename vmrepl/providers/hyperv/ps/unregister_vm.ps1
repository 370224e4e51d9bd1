# unregister_vm: the VM turned off and removed (DestroySystem leaves its disk files), then the differencing
# disks vmrepl made for it deleted and its private switch removed; a VM already gone is {"removed": false}
# and the files and switch are still cleaned up.

Invoke-Vmrepl 'Msvm_VirtualSystemManagementService.DestroySystem' {
    param($Params)
    $timeout = [int]$Params.timeout_seconds
    $removed = $false
    $system = Find-VmreplComputerSystem -VmId ([string]$Params.vm_id)
    if ($null -ne $system) {
        if ([int]$system.EnabledState -ne 3) {
            $turnOff = @{ RequestedState = [uint16]3 }
            $null = Invoke-VmreplMethod -Target $system -MethodName RequestStateChange -Arguments $turnOff -TimeoutSeconds $timeout
        }
        $service = Get-VmreplService -ClassName Msvm_VirtualSystemManagementService
        $destroy = @{ AffectedSystem = $system }
        $null = Invoke-VmreplMethod -Target $service -MethodName DestroySystem -Arguments $destroy -TimeoutSeconds $timeout
        $removed = $true
    }
    $script:VmreplOperation = 'Remove-Item'
    foreach ($file in @($Params.delete_files)) {
        if (Test-Path -LiteralPath ([string]$file)) {
            Remove-Item -LiteralPath ([string]$file) -Force
        }
    }
    if ($null -ne $Params.private_switch) {
        Remove-VmreplPrivateSwitch -Name ([string]$Params.private_switch)
    }
    return [pscustomobject]@{ removed = $removed }
}
