# get_vm: the VMs whose id or name is $Params.vm (none, one, or several: two VMs may share a name).

Invoke-Vmrepl 'Get-VM' {
    param($Params)
    $wanted = [string]$Params.vm
    $vms = @(Get-VM | Where-Object { $_.Id.ToString() -eq $wanted -or $_.Name -eq $wanted })
    return , ([object[]]@(ConvertTo-VmreplVms -Vms $vms))
}

