# list_vms: every VM on the host, with its configuration (models.Vm).

Invoke-Vmrepl 'Get-VM' {
    param($Params)
    $vms = @(Get-VM)
    return , ([object[]]@(ConvertTo-VmreplVms -Vms $vms))
}

