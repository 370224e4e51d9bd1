# destroy_reference_point: destroy one reference point of the VM; one (or a VM) already gone is {"removed": false}.

Invoke-Vmrepl 'Msvm_VirtualSystemReferencePointService.DestroyReferencePoint' {
    param($Params)
    $point = $null
    $system = Find-VmreplComputerSystem -VmId ([string]$Params.vm_id)
    if ($null -ne $system) {
        $point = Find-VmreplReferencePoint -System $system -ReferencePointId ([string]$Params.reference_point_id)
    }
    if ($null -eq $point) {
        return [pscustomobject]@{ removed = $false }
    }
    $service = Get-VmreplService -ClassName Msvm_VirtualSystemReferencePointService
    $arguments = @{ AffectedReferencePoint = $point }
    $null = Invoke-VmreplMethod -Target $service -MethodName DestroyReferencePoint -Arguments $arguments -TimeoutSeconds ([int]$Params.timeout_seconds)
    return [pscustomobject]@{ removed = $true }
}

