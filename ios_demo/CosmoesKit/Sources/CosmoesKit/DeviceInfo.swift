// DeviceInfo.swift: what a benchmark records about the device (model, OS, cores, memory) and the process's memory
// as iOS counts it (phys_footprint, the figure jetsam limits apply to; os_proc_available_memory).
import Darwin
import Foundation
import os

public enum DeviceInfo {
    /// The "device" object of a statistics file: kind "ios", the hardware model (e.g. "iPhone16,1"), the OS, cores,
    /// physical memory and the program that ran the benchmark.
    public static func current(app: String) -> [String: String] {
        let info = ProcessInfo.processInfo
        return ["kind": "ios", "model": hardwareModel(), "os": "\(osName) \(info.operatingSystemVersionString)",
                "cores": String(info.activeProcessorCount), "memory_mb": String(info.physicalMemory / 1_000_000),
                "app": app]
    }

    /// sysctl hw.machine: "iPhone16,1" on a phone, the host's model on a simulator or a Mac.
    public static func hardwareModel() -> String {
        var size = 0
        guard sysctlbyname("hw.machine", nil, &size, nil, 0) == 0, size > 0 else { return "unknown" }
        var buffer = [CChar](repeating: 0, count: size)
        guard sysctlbyname("hw.machine", &buffer, &size, nil, 0) == 0 else { return "unknown" }
        return String(cString: buffer)
    }

    private static var osName: String {
        #if os(iOS)
        return "iOS"
        #elseif os(macOS)
        return "macOS"
        #else
        return "Apple OS"
        #endif
    }
}

public enum ProcessMemory {
    /// The process's physical footprint in MB (task_vm_info.phys_footprint): what the app's RSS reads as on iOS,
    /// and what jetsam compares with the app's limit.
    public static func footprintMB() -> Double? {
        var info = task_vm_info_data_t()
        var count = mach_msg_type_number_t(MemoryLayout<task_vm_info_data_t>.size / MemoryLayout<natural_t>.size)
        let result = withUnsafeMutablePointer(to: &info) { pointer in
            pointer.withMemoryRebound(to: integer_t.self, capacity: Int(count)) {
                task_info(mach_task_self_, task_flavor_t(TASK_VM_INFO), $0, &count)
            }
        }
        return result == KERN_SUCCESS ? Double(info.phys_footprint) / 1e6 : nil
    }

    /// How much more memory this app may take before jetsam ends it, in MB (os_proc_available_memory; iOS only).
    public static func availableMB() -> Double? {
        #if os(iOS)
        let bytes = os_proc_available_memory()
        return bytes > 0 ? Double(bytes) / 1e6 : nil
        #else
        return nil
        #endif
    }
}
