# merge_vm_disks: each differencing disk merged into its parent (MergeVirtualHardDisk), deleted, and its drive
# pointed at the parent, in that order, so that a call cut short and run again only finishes the work (a
# disk already merged has no file left). The VM must be off: a disk in use is not merged.

Invoke-Vmrepl 'Msvm_ImageManagementService.MergeVirtualHardDisk' {
    param($Params)
    $timeout = [int]$Params.timeout_seconds
    $system = Get-VmreplComputerSystem -VmId ([string]$Params.vm_id)
    if ([int]$system.EnabledState -ne 3) {
        Exit-VmreplError -Operation 'Msvm_ComputerSystem' -Message "the VM $($system.ElementName) is not off (EnabledState $($system.EnabledState)): its differencing disks are merged only while it is off" -Code 32775
    }
    $service = Get-VmreplService -ClassName Msvm_ImageManagementService
    $vm = Get-VM -Id ([string]$Params.vm_id)
    $merged = New-Object 'System.Collections.Generic.List[string]'
    foreach ($disk in @($Params.disks)) {
        $path = [string]$disk.path
        if (Test-Path -LiteralPath $path) {
            $merge = @{ SourcePath = $path; DestinationPath = [string]$disk.parent }
            $null = Invoke-VmreplMethod -Target $service -MethodName MergeVirtualHardDisk -Arguments $merge -TimeoutSeconds $timeout
            $script:VmreplOperation = 'Remove-Item'
            if (Test-Path -LiteralPath $path) {
                Remove-Item -LiteralPath $path -Force
            }
            $merged.Add($path)
        }
        $script:VmreplOperation = 'Set-VMHardDiskDrive'
        $drive = Get-VMHardDiskDrive -VM $vm -ControllerType ([string]$disk.controller_type) -ControllerNumber ([int]$disk.controller_number) -ControllerLocation ([int]$disk.controller_location)
        Set-VMHardDiskDrive -VMHardDiskDrive $drive -Path ([string]$disk.parent)
    }
    return [pscustomobject]@{ merged = [string[]]$merged.ToArray() }
}
