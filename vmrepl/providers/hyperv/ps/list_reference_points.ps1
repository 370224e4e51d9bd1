# list_reference_points: every reference point of the VM (RCT or Hyper-V Replica's log based ones).

Invoke-Vmrepl 'Msvm_ReferencePointOfVirtualSystem' {
    param($Params)
    $system = Get-VmreplComputerSystem -VmId ([string]$Params.vm)
    $points = @(Get-VmreplReferencePoints -System $system)
    return , ([object[]]@(foreach ($point in $points) { ConvertTo-VmreplReferencePoint -ReferencePoint $point }))
}

