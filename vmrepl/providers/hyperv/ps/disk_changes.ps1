# disk_changes: the ranges of the disk at $Params.path changed since the RCT id $Params.limit_id, over
# [offset, offset + length), asked in `chunk`-sized pieces (ByteLength must stay below the disk's size) and
# advancing by ProcessedByteLength, which may be less than asked. Stops once it holds max_ranges ranges, and
# stops with stalled = true rather than spin when the host processed nothing.

Invoke-Vmrepl 'Msvm_ImageManagementService.GetVirtualDiskChanges' {
    param($Params)
    $service = Get-VmreplService -ClassName Msvm_ImageManagementService
    $start = [uint64]$Params.offset
    $end = [uint64]($start + [uint64]$Params.length)
    $chunk = [uint64]$Params.chunk
    $maxRanges = [int]$Params.max_ranges
    $ranges = New-Object 'System.Collections.Generic.List[object]'
    $offset = $start
    $stalled = $false
    while ($offset -lt $end -and $ranges.Count -lt $maxRanges) {
        $length = [uint64][Math]::Min($chunk, [uint64]($end - $offset))
        $arguments = @{
            Path = [string]$Params.path
            LimitId = [string]$Params.limit_id
            TargetSnapshotId = ''
            ByteOffset = $offset
            ByteLength = $length
        }
        $call = Invoke-VmreplMethod -Target $service -MethodName GetVirtualDiskChanges -Arguments $arguments -TimeoutSeconds ([int]$Params.timeout_seconds)
        $offsets = @($call.Output.ChangedByteOffsets | Where-Object { $null -ne $_ })
        $lengths = @($call.Output.ChangedByteLengths | Where-Object { $null -ne $_ })
        if ($offsets.Length -ne $lengths.Length) {
            throw "GetVirtualDiskChanges returned $($offsets.Length) offsets but $($lengths.Length) lengths"
        }
        for ($i = 0; $i -lt $offsets.Length; $i++) {
            if ([uint64]$lengths[$i] -gt 0) {
                $ranges.Add([pscustomobject]@{ offset = [int64]$offsets[$i]; length = [int64]$lengths[$i] })
            }
        }
        $processed = [uint64]$call.Output.ProcessedByteLength
        if ($processed -eq 0) {
            $stalled = $true
            break
        }
        if ($processed -gt $length) {
            $processed = $length
        }
        $offset = [uint64]($offset + $processed)
    }
    return [pscustomobject]@{
        processed = [int64]($offset - $start)
        ranges = [object[]]$ranges.ToArray()
        stalled = $stalled
    }
}

